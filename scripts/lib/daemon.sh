# Shared by the load scripts (bench.sh, instructions.sh); source it from the repository root.

# A free TCP port on the loopback interface.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Writes the settings every load run starts from to $1: the ingress on port $2, the admin
# endpoint on port $3, the Auth Token the load generator signs with ("bench-token"). The
# caller appends its delivery and sink settings.
daemon_config() {
  cat > "$1" <<TOML
[ingress]
listen = "127.0.0.1:$2"
public_url = "http://127.0.0.1:$2"
[admin]
listen = "127.0.0.1:$3"
[twilio]
auth_tokens = ["bench-token"]
TOML
}
