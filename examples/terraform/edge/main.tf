# An edge for a pool, ready to be enrolled with `edgible-edge enroll --token ...`.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_device_pool" "office" {
  name        = "example-edge-office"
  tunnel_cidr = "100.99.0.0/24"
}

resource "edgible_edge" "public" {
  name     = "example-edge"
  pool_id  = edgible_device_pool.office.id
  endpoint = "203.0.113.1:51820"
}

output "enrollment_token" {
  value     = edgible_edge.public.enrollment_token
  sensitive = true
}

output "tunnel_address" {
  value = edgible_edge.public.tunnel_address
}
