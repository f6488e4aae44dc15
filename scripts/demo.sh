#!/usr/bin/env bash
# Run the Mailgate demo: installs what it needs, starts a private Dovecot as the
# upstream provider, fills sample data and runs the gateway in the foreground.
source "$(dirname "$0")/_env.sh"
exec mailgate demo --dir var/demo "$@"
