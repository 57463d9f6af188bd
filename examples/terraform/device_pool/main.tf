# A pool of user-owned devices and a pool of operator cloud hosts.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_device_pool" "home" {
  name        = "example-home"
  tunnel_cidr = "100.96.0.0/24"
}

resource "edgible_device_pool" "cloud" {
  name        = "example-cloud"
  tunnel_cidr = "100.97.0.0/20"
  kind        = "cloud"
  region      = "eu-west-1"
}
