# Quickstart: a device pool, one device, an application published at a hostname, and the
# placement that runs the application on the device.
#
#   export EDGIBLE_ENDPOINT=http://127.0.0.1:7070   # the server's URL
#   export EDGIBLE_API_KEY=edg_...                  # an API key with the write scope
#   terraform init && terraform apply
#
# Then enroll the machine with the token this configuration outputs:
#
#   edgible-agent enroll --server "$EDGIBLE_ENDPOINT" --token "$(terraform output -raw enrollment_token)"

terraform {
  required_version = ">= 1.5"
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

# Endpoint and key come from EDGIBLE_ENDPOINT and EDGIBLE_API_KEY.
provider "edgible" {}

variable "hostname" {
  description = "The public hostname of the application."
  type        = string
  default     = "hello.quickstart.example.test"
}

resource "edgible_device_pool" "home" {
  name        = "home"
  tunnel_cidr = "100.96.0.0/24"
}

resource "edgible_device" "laptop" {
  name    = "laptop"
  pool_id = edgible_device_pool.home.id
  labels = {
    site = "home"
  }
}

resource "edgible_application" "hello" {
  name      = "hello"
  hostnames = [var.hostname]
  port      = 8080

  workload {
    process {
      command = "python3"
      args    = ["-m", "http.server", "8080"]
    }
  }

  health_check {
    protocol = "http"
    path     = "/"
  }
}

resource "edgible_placement" "hello" {
  application_id = edgible_application.hello.id
  strategy       = "serving-device"
  device_id      = edgible_device.laptop.id
}

output "url" {
  value = "https://${var.hostname}/"
}

output "tunnel_address" {
  value = edgible_device.laptop.tunnel_address
}

output "enrollment_token" {
  value     = edgible_device.laptop.enrollment_token
  sensitive = true
}
