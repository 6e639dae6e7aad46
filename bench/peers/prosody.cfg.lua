-- Prosody for the rookery-bench comparison (bench/compare.sh fills in the
-- @...@ placeholders). Kept as close as the servers allow to
-- bench/peers/rookery.toml and ejabberd.yml: one virtual host, client
-- connections on loopback, SQLite storage, SCRAM keys stored (never plaintext
-- passwords), no traffic shaping (mod_limits off), 256 KiB stanza limit,
-- warnings-only logging, the same XEPs switched on.
admins = { }
pidfile = "@DIR@/prosody.pid"
data_path = "@DIR@/data"
certificates = "@DIR@"
plugin_paths = { }
network_backend = "epoll"
-- Like the others, queue up to 1024 pending connections.
network_settings = { tcp_backlog = 1024 }

modules_enabled = {
    "roster"; "saslauth"; "tls"; "disco"; "blocklist"; "carbons"; "private";
    "smacks"; "vcard"; "csi_simple"; "ping"; "register"; "version";
    "lastactivity"; "offline"; "posix"; "websocket";
}
modules_disabled = { "s2s" }

c2s_ports = { @PORT@ }
c2s_interfaces = { "127.0.0.1" }
c2s_direct_tls_ports = { }
s2s_ports = { }
-- XMPP over WebSocket (RFC 7395) at /xmpp-websocket on loopback, like the
-- others; a loopback WebSocket counts as secure, as behind a TLS proxy.
http_ports = { @PORT_HTTP@ }
http_interfaces = { "127.0.0.1" }
https_ports = { }
consider_websocket_secure = true
c2s_stanza_size_limit = 256 * 1024

c2s_require_encryption = @REQUIRE_TLS@
allow_unencrypted_plain_auth = false

-- Passwords as salted SCRAM-SHA-1 keys, 4096 iterations like the others.
authentication = "internal_hashed"
default_iteration_count = 4096

storage = "sql"
sql = { driver = "SQLite3"; database = "@DIR@/prosody.sqlite" }

-- The bench registers its accounts in-band, many per second, from loopback.
allow_registration = true
min_seconds_between_registrations = 0
registration_whitelist = { "127.0.0.1" }

log = { warn = "@DIR@/prosody.log" }

VirtualHost "localhost"
    ssl = { certificate = "@DIR@/cert.pem"; key = "@DIR@/key.pem" }
