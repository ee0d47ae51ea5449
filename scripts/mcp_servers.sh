#!/usr/bin/env bash
# Install the MCP servers that configs/mcp-servers.json runs, pinned, into .mcp/ (or $TTPA_MCP_HOME).
# Each Python server gets a virtualenv of its own: mcp-server-sqlite and mcp-server-calculator need
# mcp<2 while time and git need mcp>=2.3, and one venv cannot hold both. The Node servers are npm
# packages run from their installed files (npx with no network hangs). A second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
home="${TTPA_MCP_HOME:-.mcp}"
py="${PYTHON:-python3}"
stamp="$home/.installed"
want="$(sha256sum scripts/mcp_servers.sh | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "mcp-servers: $home is up to date"
  exit 0
fi
echo "mcp-servers: installing into $home (about a minute)"
mkdir -p "$home"
python_server() {  # name, requirements... (the SDK pinned too: sqlite crashes at start on mcp 2)
  local dir="$home/$1"; shift
  [[ -x "$dir/bin/python" ]] || "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true
  "$dir/bin/python" -c "import mcp" || { echo "mcp-servers: $dir does not import mcp" >&2; return 1; }
}
node_servers() {
  mkdir -p "$home/node" && cd "$home/node"
  [[ -f package.json ]] || echo '{"private": true}' > package.json
  npm install --silent --no-audit --no-fund \
    @modelcontextprotocol/server-filesystem@2026.8.31 @modelcontextprotocol/server-memory@2026.8.31
}
python_server time "mcp-server-time==2026.10.19" "mcp==2.3.0" &
python_server git "mcp-server-git==2026.10.19" "mcp==2.3.0" &
python_server sqlite "mcp-server-sqlite==2025.4.25" "mcp==1.30.0" &
python_server calculator "mcp-server-calculator==0.2.1" "mcp==1.30.0" &
node_servers &
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
if [[ "$failed" != 0 ]]; then echo "mcp-servers: an install failed (see above)" >&2; exit 1; fi
echo "$want" > "$stamp"
echo "mcp-servers: done"
