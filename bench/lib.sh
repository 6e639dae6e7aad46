# Shell functions shared by bench/compare.sh and bench/callgrind.sh (sourced
# from the repository root): a server on loopback from the templates in
# bench/peers/, with its own certificate.

# True when something listens on 127.0.0.1:PORT.
listening() { # port
    (echo > "/dev/tcp/127.0.0.1/$1") 2> /dev/null
}

# The pid of the process listening on 127.0.0.1:PORT (empty when none).
pid_on() { # port
    local inode
    inode=$(awk -v port="$(printf '%04X' "$1")" '$2 ~ ":"port"$" && $4 == "0A" {print $10; exit}' /proc/net/tcp)
    for fd in /proc/[0-9]*/fd/*; do
        if [ "$(readlink "$fd" 2> /dev/null)" = "socket:[$inode]" ]; then
            echo "$fd" | cut -d/ -f3
            return
        fi
    done
}

# Installs Debian packages without starting their system services (a
# reference server's would take port 5222).
install_quietly() { # package...
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d > /dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" > /dev/null
    $sudo rm -f /usr/sbin/policy-rc.d
}

# The configuration of a cluster node of the bench: STARTTLS on PORT,
# direct TLS on PORT+1, HTTP on PORT+2, PostgreSQL and one NATS server.
cluster_node_toml() { # dest, data dir, port, postgres url, nats port, node name
    cat > "$1" <<TOML
[server]
data_dir = "$2"
[c2s]
starttls_listen = "127.0.0.1:$3"
direct_tls_listen = "127.0.0.1:$(($3 + 1))"
[http]
listen = "127.0.0.1:$(($3 + 2))"
[storage]
backend = "postgres"
postgres_url = "$4"
[cluster]
node = "$6"
nats = ["nats://127.0.0.1:$5"]
[log]
level = "warn"
TOML
}

# A self-signed P-256 certificate for localhost: DIR/cert.pem and DIR/key.pem.
self_signed_cert() { # dir
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1/key.pem" -out "$1/cert.pem" \
        -days 30 -subj /CN=localhost -addext subjectAltName=DNS:localhost 2> /dev/null
}

# Writes bench/peers/TEMPLATE to DEST with its @...@ placeholders filled in:
# the data folder, the ports (PORT, PORT+1 direct TLS, PORT+2 HTTP) and the
# TLS and PLAIN settings.
render_config() { # template, dest, dir, port, require_tls, allow_plain
    sed -e "s#@DIR@#$3#g" -e "s#@PORT@#$4#g" -e "s#@PORT_DIRECT@#$(($4 + 1))#g" \
        -e "s#@PORT_HTTP@#$(($4 + 2))#g" -e "s#@REQUIRE_TLS@#$5#g" \
        -e "s#@ALLOW_PLAIN@#$6#g" "bench/peers/$1" > "$2"
}
