# An internal tool for members of the organization (after logging in) and for a CI job
# holding a key of its own. Either one gets in.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_application" "reports" {
  name      = "example-reports"
  hostnames = ["reports.application-key.example.test"]
  port      = 8080

  workload {
    process {
      command = "/opt/reports/bin/serve"
    }
  }

  access {
    organization {}
    api_key {}
  }
}

resource "edgible_application_key" "ci" {
  application_id = edgible_application.reports.id
  name           = "ci"
  expires_at     = "2030-01-01T00:00:00Z"
}

# Send it as `Authorization: Bearer <secret>` or `X-Edgible-Key: <secret>`.
output "ci_key" {
  value     = edgible_application_key.ci.secret
  sensitive = true
}
