#!/usr/bin/env bash
# Provision a Raspberry Pi (Raspberry Pi OS / Debian bookworm) as a Nära home kit.
#
#   sudo deploy/pi/provision.sh --server https://nara.example.se --code ABCD-EFGH \
#        --package nara-0.1.0-py3-none-any.whl          (or a checkout of the repository)
#
# Installs the system packages the kit uses, makes the nara-edge user, puts Nära in a virtual
# environment in /opt/nara/venv, writes /etc/nara/edge.toml (if there is none), enrols the kit
# with the code from `nara device create` (if it has no credential yet), installs the BBR
# settings from deploy/edge and the nara-edge service, and starts it. Running it again does no
# harm: what is in place is left as it is, Nära is upgraded from --package, the service restarted.
# --dry-run prints what it would do and changes nothing. docs/deploy.md, "A home kit".
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: provision.sh --server URL --package WHEEL_OR_DIR [--code ABCD-EFGH] [--with-screen] [--dry-run]

  --server URL      the Nära server, e.g. https://nara.example.se
  --package PATH    Nära to install: a wheel (nara-*.whl) or a checkout of the repository
  --code CODE       the kit's enrolment code from `nara device create` (needed until it is enrolled)
  --with-screen     also install Chromium for the kit's screen (http://127.0.0.1:8090/)
  --dry-run         print what would be done, change nothing
EOF
}

fail() {
    echo "provision: error: $*" >&2
    exit 1
}

say() {
    echo "provision: $*"
}

SERVER=""
PACKAGE=""
CODE=""
WITH_SCREEN=0
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --server) [ $# -ge 2 ] || fail "--server needs a URL"; SERVER="$2"; shift 2 ;;
        --package) [ $# -ge 2 ] || fail "--package needs a path"; PACKAGE="$2"; shift 2 ;;
        --code) [ $# -ge 2 ] || fail "--code needs the enrolment code"; CODE="$2"; shift 2 ;;
        --with-screen) WITH_SCREEN=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; echo >&2; fail "unknown argument: $1" ;;
    esac
done

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=/opt/nara/venv
NARA="$VENV/bin/nara"
KIT_USER=nara-edge
STATE_DIR=/var/lib/nara-edge
CREDENTIAL="$STATE_DIR/credential.json"
CONFIG=/etc/nara/edge.toml
UNIT=/etc/systemd/system/nara-edge.service

[ -n "$SERVER" ] || { usage >&2; fail "--server is required"; }
[ -n "$PACKAGE" ] || { usage >&2; fail "--package is required"; }
case "$SERVER" in
    https://*) ;;
    http://127.0.0.1* | http://localhost*) say "warning: $SERVER is not https; only for a test on this machine" ;;
    *) fail "--server must be an https:// URL (the kit's credential travels over it): $SERVER" ;;
esac
case "$SERVER" in
    *[[:space:]\"\'\\]*) fail "--server must not contain spaces, quotes or backslashes: $SERVER" ;;
esac
[ -e "$PACKAGE" ] || fail "--package $PACKAGE does not exist"
PACKAGE="$(cd "$(dirname "$PACKAGE")" && pwd)/$(basename "$PACKAGE")"
if [ -d "$PACKAGE" ]; then
    [ -f "$PACKAGE/pyproject.toml" ] || fail "--package $PACKAGE is a directory without pyproject.toml"
else
    case "$PACKAGE" in
        *.whl) ;;
        *) fail "--package must be a wheel (.whl) or a checkout of the repository: $PACKAGE" ;;
    esac
fi
for file in nara-edge.service edge/90-nara-edge.conf edge/nara-edge-bbr.conf; do
    [ -f "$DEPLOY_DIR/$file" ] || fail "$DEPLOY_DIR/$file is missing: run this script from a checkout of Nära"
done
if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    fail "run as root (sudo), or with --dry-run to see what it would do"
fi

# Run a command, or print it in a dry run. The enrolment code is never printed.
run() {
    local shown="$*"
    if [ -n "$CODE" ]; then
        shown="${shown//"$CODE"/<code>}"
    fi
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: $shown"
    else
        echo "+ $shown"
        "$@"
    fi
}

# Install a file from deploy/ if it differs from what is there.
install_file() {
    local source="$1" target="$2" mode="$3"
    if [ -f "$target" ] && cmp -s "$source" "$target"; then
        say "$target is up to date"
        return 1
    fi
    run install -D -m "$mode" "$source" "$target"
}

# --- system packages ------------------------------------------------------------------------
apt_known() {
    apt-cache show "$1" >/dev/null 2>&1
}
installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}
wanted=(python3 python3-venv python3-pip v4l-utils alsa-utils libopus0 ca-certificates)
# The Raspberry Pi camera: picamera2 and libcamera come from Raspberry Pi OS's own archive.
for optional in python3-picamera2 python3-libcamera libcamera-apps; do
    if apt_known "$optional"; then wanted+=("$optional"); else say "$optional is not in this system's archive: skipped"; fi
done
if [ "$WITH_SCREEN" = 1 ]; then
    if apt_known chromium-browser; then wanted+=(chromium-browser); else wanted+=(chromium); fi
fi
missing=()
for package in "${wanted[@]}"; do
    installed "$package" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update -q
    run apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "system packages are installed"
fi

# --- the kit's user -------------------------------------------------------------------------
if id -u "$KIT_USER" >/dev/null 2>&1; then
    say "user $KIT_USER exists"
else
    run useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin "$KIT_USER"
fi
# The camera and the sound card (the service adds these groups too; enrolment runs outside it).
run usermod --append --groups video,audio "$KIT_USER"
run install -d -o "$KIT_USER" -g "$KIT_USER" -m 0700 "$STATE_DIR"

# --- Nära in a virtual environment ----------------------------------------------------------
# System site packages: picamera2 and libcamera exist only as Debian packages.
if [ -x "$VENV/bin/python" ]; then
    say "virtual environment $VENV exists"
else
    run python3 -m venv --system-site-packages "$VENV"
fi
run "$VENV/bin/python" -m pip install --quiet --upgrade "$PACKAGE"

# --- the kit's configuration ----------------------------------------------------------------
if [ -f "$CONFIG" ]; then
    say "$CONFIG exists: left as it is"
else
    if [ "$DRY_RUN" = 1 ]; then
        echo "would write $CONFIG with server = \"$SERVER\""
    else
        echo "+ write $CONFIG"
        install -d -m 0755 "$(dirname "$CONFIG")"
        cat >"$CONFIG" <<EOF
# The Nära home kit's settings (edge/config.py; nara edge check-config $CONFIG).
server = "$SERVER"
credential = "$CREDENTIAL"
camera = "auto"
microphone = "auto"
language = "sv"
data_dir = "$STATE_DIR"
EOF
        chmod 0644 "$CONFIG"
    fi
fi
run "$NARA" edge check-config "$CONFIG"

# --- enrolment ------------------------------------------------------------------------------
if [ -f "$CREDENTIAL" ]; then
    say "the kit is enrolled ($CREDENTIAL exists)"
elif [ -z "$CODE" ]; then
    fail "the kit is not enrolled yet: give --code (from: nara device create --name \"Kit 7\")"
else
    run runuser -u "$KIT_USER" -- "$NARA" edge enrol --server "$SERVER" --code "$CODE" --credential "$CREDENTIAL"
fi

# --- BBR for the photo uploads --------------------------------------------------------------
if install_file "$DEPLOY_DIR/edge/90-nara-edge.conf" /etc/sysctl.d/90-nara-edge.conf 0644; then
    run sysctl --quiet --load /etc/sysctl.d/90-nara-edge.conf
fi
if install_file "$DEPLOY_DIR/edge/nara-edge-bbr.conf" /etc/modules-load.d/nara-edge-bbr.conf 0644; then
    run modprobe tcp_bbr
fi

# --- the service ----------------------------------------------------------------------------
install_file "$DEPLOY_DIR/nara-edge.service" "$UNIT" 0644 || true
run systemctl daemon-reload
run systemctl enable nara-edge.service
# A restart picks up a new version of Nära or of the unit; a kit not running yet starts.
run systemctl restart nara-edge.service
if [ "$DRY_RUN" = 1 ]; then
    say "dry run: nothing was changed"
else
    say "done: the kit runs as nara-edge.service (journalctl -u nara-edge); its screen is http://127.0.0.1:8090/"
fi
