# A device, ready to be enrolled with `edgible-agent enroll --token ...`.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_device_pool" "office" {
  name        = "example-office"
  tunnel_cidr = "100.98.0.0/24"
}

resource "edgible_device" "nuc" {
  name    = "example-nuc"
  pool_id = edgible_device_pool.office.id
  labels = {
    "site"          = "office"
    "edgible.io/hw" = "nuc"
  }
}

output "enrollment_token" {
  value     = edgible_device.nuc.enrollment_token
  sensitive = true
}

output "tunnel_address" {
  value = edgible_device.nuc.tunnel_address
}
