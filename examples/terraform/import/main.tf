# Bringing an application made elsewhere (the CLI, the API) under Terraform.
#
# Every resource imports by its id:
#
#   terraform import edgible_application.legacy 01939c4e-...
#
# or, as here, with an import block (`terraform plan -var application_id=...` shows what
# will be imported; `terraform plan -generate-config-out=generated.tf` writes the block).

terraform {
  required_version = ">= 1.6"
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

variable "application_id" {
  description = "The id of the application to import (`edgible application list` shows it)."
  type        = string
}

import {
  to = edgible_application.legacy
  id = var.application_id
}

resource "edgible_application" "legacy" {
  name      = "legacy"
  hostnames = ["legacy.import.example.test"]
  port      = 8080

  workload {
    process {
      command = "/srv/legacy/run"
    }
  }
}
