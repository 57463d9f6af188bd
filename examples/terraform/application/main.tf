# Applications with each kind of workload and the optional settings.

terraform {
  required_providers {
    edgible = {
      source = "edgible/edgible"
    }
  }
}

provider "edgible" {}

resource "edgible_application" "blog" {
  name      = "example-blog"
  hostnames = ["blog.application.example.test", "www.blog.application.example.test"]
  port      = 2368
  env = {
    NODE_ENV = "production"
  }

  workload {
    container {
      image = "ghost:5-alpine"
      ports = [2368]
      env = {
        url = "https://blog.application.example.test"
      }
    }
  }

  health_check {
    protocol         = "http"
    path             = "/ghost/api/admin/site/"
    interval_seconds = 30
    timeout_seconds  = 5
  }

  # Only members of the organization, after logging in.
  access {
    organization {
      roles = ["owner", "admin"]
    }
  }

  storage {
    name       = "content"
    size_mib   = 2048
    mount_path = "/var/lib/ghost/content"
    movable    = true
  }

  sleep {
    idle_timeout_seconds = 900
    mode                 = "stop"
  }

  resources {
    vcpus      = 1
    memory_mib = 512
  }
}

resource "edgible_application" "tool" {
  name      = "example-tool"
  hostnames = ["tool.application.example.test"]
  port      = 8080

  workload {
    process {
      command     = "/opt/tool/bin/serve"
      args        = ["--port", "8080"]
      working_dir = "/opt/tool"
    }
  }

  # Anyone with the short code the server generates (see the `short_code` attribute).
  access {
    short_code {}
  }
}

resource "edgible_application" "sandbox" {
  name      = "example-sandbox"
  hostnames = ["sandbox.application.example.test"]
  port      = 80

  workload {
    vm {
      kernel = "/var/lib/edgible/images/vmlinux"
      rootfs = "/var/lib/edgible/images/sandbox.ext4"
    }
  }

  health_check {
    protocol = "tcp"
  }
}

output "tool_short_code" {
  value     = edgible_application.tool.short_code
  sensitive = true
}
