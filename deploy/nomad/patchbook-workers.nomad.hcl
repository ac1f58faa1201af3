# N patchbook workers as one Nomad batch job: allocation i runs
#   patchbook worker --id worker-i
# against the PostgreSQL store, claiming hosts of the open wave until the run
# ends, then exits 0. Nomad places the allocations, restarts a failed task in
# place and reschedules a lost allocation; a worker that dies loses its lease and
# the others (or its restart) finish its hosts from the journal.
#
# The store URL, the SSH key and known_hosts come from the Nomad Variable
# nomad/jobs/patchbook-workers (keys store_url, ssh_key, known_hosts):
#
#   nomad var put nomad/jobs/patchbook-workers \
#     store_url='postgres://patchbook@db.example.com/patchbook' \
#     ssh_key=@id_ed25519 known_hosts=@known_hosts
#   nomad job run -var workers=4 deploy/nomad/patchbook-workers.nomad.hcl
#
# With Vault instead, replace each `nomadVar` below with a `secret` read
# (`{{ with secret "kv/data/patchbook" }}{{ .Data.data.store_url }}{{ end }}`) and
# give the task a `vault {}` block.

variable "image" {
  type        = string
  description = "The patchbook image (deploy/Dockerfile)."
  default     = "registry.example.com/patchbook:0.1.0"
}

variable "workers" {
  type        = number
  description = "How many workers claim hosts at once."
  default     = 4
}

variable "fleet_dir" {
  type        = string
  description = "Host folder with inventory.toml and the playbooks, the same on every client."
  default     = "/srv/patchbook/fleet"
}

job "patchbook-workers" {
  type        = "batch"
  datacenters = ["*"]

  group "worker" {
    count = var.workers

    # A task that exits non-zero is restarted in place (its alloc dir, with the
    # state directory and backups, survives); after that the allocation fails
    # and is rescheduled, possibly on another client.
    restart {
      attempts = 3
      interval = "30m"
      delay    = "15s"
      mode     = "fail"
    }

    reschedule {
      attempts       = 5
      interval       = "6h"
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = false
    }

    task "worker" {
      driver = "docker"
      user   = "10001"

      config {
        image = var.image
        args = [
          "worker",
          "--id", "worker-${NOMAD_ALLOC_INDEX}",
          "--config", "${NOMAD_TASK_DIR}/patchbook.toml",
          "--state-dir", "${NOMAD_ALLOC_DIR}/data/state",
        ]
        readonly_rootfs = true
        cap_drop        = ["all"]
        security_opt    = ["no-new-privileges"]
        mount {
          type     = "bind"
          source   = var.fleet_dir
          target   = "/etc/patchbook/fleet"
          readonly = true
        }
      }

      # The store URL as PATCHBOOK_STORE: in the task's environment (patchbook
      # reads it there; never an argument, where its password would show in every
      # process listing).
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/patchbook-workers" }}PATCHBOOK_STORE={{ .store_url }}{{ end }}
        EOT
        destination = "secrets/store.env"
        env         = true
        perms       = "0400"
        uid         = 10001
        gid         = 10001
      }

      # The SSH private key and known_hosts in the task's secrets/ folder
      # (a tmpfs, never on the client's disk), readable by the worker alone.
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/patchbook-workers" }}{{ .ssh_key }}{{ end }}
        EOT
        destination = "secrets/id_ed25519"
        perms       = "0400"
        uid         = 10001
        gid         = 10001
      }

      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/patchbook-workers" }}{{ .known_hosts }}{{ end }}
        EOT
        destination = "secrets/known_hosts"
        perms       = "0400"
        uid         = 10001
        gid         = 10001
      }

      # patchbook.toml: the fleet mounted above, the key and known_hosts from
      # secrets/ (the task's secrets folder is /secrets inside the container).
      template {
        data        = <<-EOT
          inventory = ["/etc/patchbook/fleet/inventory.toml"]
          playbooks = "/etc/patchbook/fleet"
          forks = 20

          [ssh]
          user = "root"
          identity = "/secrets/id_ed25519"
          known_hosts = "/secrets/known_hosts"
        EOT
        destination = "local/patchbook.toml"
      }

      env {
        HOME = "/alloc/data"
      }

      # SIGTERM lets a worker finish the host steps in flight before it exits.
      kill_timeout = "5m"

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
