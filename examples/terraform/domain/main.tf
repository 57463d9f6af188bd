# A domain the organization claims. It starts pending: publish the TXT record it answers
# (`txt_record_name` = `txt_record_value`), then run `edgible domain verify example-domain.test`.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_domain" "company" {
  name = "example-domain.test"
}

output "txt_record_name" {
  value = edgible_domain.company.txt_record_name
}

output "txt_record_value" {
  value = edgible_domain.company.txt_record_value
}
