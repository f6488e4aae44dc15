#!/usr/bin/env bash
# Installs what Mailgate needs on a fresh Debian 12 machine, into $PYTHON's
# environment (scripts/_env.sh passes the project's .venv).  Idempotent.
#   scripts/install_deps.sh          # runtime + demo upstream (Dovecot)
#   scripts/install_deps.sh --test   # plus test tools (Postfix tools, mail clients, PostgreSQL, Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_pkgs=(dovecot-imapd dovecot-submissiond dovecot-lmtpd libmagic1 ca-certificates)
if [ "$want_test" = 1 ]; then
  apt_pkgs+=(postfix swaks libnet-ssleay-perl libio-socket-ssl-perl msmtp isync mutt offlineimap3 fetchmail getmail6 curl postgresql chromium fonts-wqy-microhei)
fi

missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Postfix asks how it should run; we only use its tools and private instances.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  echo "Installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages may start system daemons; Mailgate runs its own private instances.
  for svc in dovecot postfix postgresql; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

py=${PYTHON:-python3}
extras="."
[ "$want_test" = 1 ] && extras=".[test]"
"$py" -m pip install -q --disable-pip-version-check -e "$extras"
