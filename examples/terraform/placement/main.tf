# An application placed on a device. Changing `device_id` moves the application in place: the
# apply waits for the migration, at most `migration_timeout_seconds`.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_device_pool" "lab" {
  name        = "example-lab"
  tunnel_cidr = "100.99.0.0/24"
}

resource "edgible_device" "rack" {
  for_each = toset(["example-rack-a", "example-rack-b"])
  name     = each.key
  pool_id  = edgible_device_pool.lab.id
}

resource "edgible_application" "api" {
  name      = "example-api"
  hostnames = ["api.placement.example.test"]
  port      = 3000

  workload {
    process {
      command = "/srv/api/server"
    }
  }
}

variable "device" {
  description = "Which rack the API runs on."
  type        = string
  default     = "example-rack-a"
}

# `terraform apply -var device=example-rack-b` moves the API to the other rack.
resource "edgible_placement" "api" {
  application_id            = edgible_application.api.id
  strategy                  = "serving-device"
  device_id                 = edgible_device.rack[var.device].id
  migration_timeout_seconds = 600
}
