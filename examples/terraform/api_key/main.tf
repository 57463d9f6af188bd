# An API key for a CI system. Managing keys needs a provider key with the admin scope.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_api_key" "ci" {
  name       = "example-ci"
  scopes     = ["write"]
  expires_at = "2030-01-01T00:00:00Z"
}

output "ci_key" {
  value     = edgible_api_key.ci.secret
  sensitive = true
}
