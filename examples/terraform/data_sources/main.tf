# Reading existing objects: the organization of the key, a pool and a device by name.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

variable "pool" {
  type    = string
  default = "home"
}

variable "device" {
  type    = string
  default = "laptop"
}

data "edgible_organization" "current" {}

data "edgible_device_pool" "pool" {
  name = var.pool
}

data "edgible_device" "device" {
  name = var.device
}

output "organization" {
  value = data.edgible_organization.current.name
}

output "pool_network" {
  value = data.edgible_device_pool.pool.tunnel_cidr
}

output "device_address" {
  value = data.edgible_device.device.tunnel_address
}
