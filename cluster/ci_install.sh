#!/usr/bin/env bash
# Installs what the real-cluster tests (tests/test_cluster.py, marker `cluster`) need beyond the
# virtualenv: a PostgreSQL server (Debian's `postgresql` package) and `runuser` (util-linux), because
# PostgreSQL refuses to run as root and CI runs as root; and Debian's `chromium` for the MLflow UI test. Idempotent; does nothing when all is present.
set -euo pipefail

have_pg() { compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || command -v initdb > /dev/null; }

missing=()
have_pg || missing+=(postgresql)
command -v runuser > /dev/null || missing+=(util-linux)
command -v chromium > /dev/null || missing+=(chromium)  # the MLflow UI browser test (tests/mlflow_ui.py)

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "ci_install.sh: need root to apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends keeps it small; the package's postinst does not need a running systemd.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

have_pg || { echo "ci_install.sh: PostgreSQL still missing after install" >&2; exit 1; }
if [[ $(id -u) -eq 0 ]] && ! id postgres > /dev/null 2>&1; then
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi
# Python side, in the virtualenv: the psycopg2 driver MLflow uses for postgresql+psycopg2://, and
# Flask-WTF, which MLflow's basic-auth app needs (the `mlflow[auth]` extra).
py="${PYTHON:-.venv/bin/python}"
if [[ -x "$py" ]]; then
  "$py" -c "import psycopg2" 2> /dev/null || "$py" -m pip install -q "psycopg2-binary>=2.9"
  "$py" -c "import flask_wtf" 2> /dev/null || "$py" -m pip install -q "Flask-WTF<2"
fi
echo "ci_install.sh: PostgreSQL $(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1) ready" >&2
