# A stateful application whose volume moves with it. Changing `device_id` (here: the `device`
# variable) migrates the application in place, data and all:
#
#   terraform apply                               # runs on example-store-a
#   terraform apply -var device=example-store-b   # moves it, waiting for the migration
#
# The apply waits for the migration (preflight, quiesce, snapshot, ship, restore, cutover), at
# most `migration_timeout_seconds`. When it fails, the application keeps running on the old
# device with its data, the apply fails naming the phase and the reason, and the state keeps the
# old device, so the next plan proposes the move again. `edgible app migrations example-notes`
# lists every move. A volume with `movable = false` makes the server refuse the move.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_device_pool" "stores" {
  name        = "example-stores"
  tunnel_cidr = "100.98.0.0/24"
}

resource "edgible_device" "store" {
  for_each = toset(["example-store-a", "example-store-b"])
  name     = each.key
  pool_id  = edgible_device_pool.stores.id
}

resource "edgible_application" "notes" {
  name      = "example-notes"
  hostnames = ["notes.migration.example.test"]
  port      = 8080

  workload {
    container {
      image = "ghcr.io/example/notes:1"
      ports = [8080]
    }
  }

  health_check {
    protocol         = "http"
    path             = "/"
    interval_seconds = 5
  }

  # The container sees the volume at /data; it moves with the application.
  storage {
    name       = "notes"
    size_mib   = 256
    mount_path = "/data"
    movable    = true
  }
}

variable "device" {
  description = "Which device the notes service runs on."
  type        = string
  default     = "example-store-a"
}

resource "edgible_placement" "notes" {
  application_id            = edgible_application.notes.id
  strategy                  = "serving-device"
  device_id                 = edgible_device.store[var.device].id
  migration_timeout_seconds = 600
}
