//! [`HaProxy`]: Debian's `haproxy` running the shipped example configuration
//! (`config/cluster/haproxy.cfg`) in front of test nodes, on free ports.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;
use crate::process::NodeProcess;

/// A running `haproxy`.
#[derive(Debug)]
pub struct HaProxy {
    /// The STARTTLS frontend.
    pub starttls: SocketAddr,
    /// The direct TLS frontend.
    pub direct_tls: SocketAddr,
    /// The WebSocket frontend.
    pub websocket: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// Runs `template` (the example configuration, written for nodes 1 to 3 on
    /// ports 530n, 531n and 528n) with its addresses replaced by `nodes`' and
    /// its frontends on free ports.
    pub fn start(template: &Path, nodes: &[&NodeProcess]) -> HaProxy {
        let mut config = std::fs::read_to_string(template).expect("the HAProxy example");
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let (starttls, direct_tls, websocket) = (
            loopback(free_port()),
            loopback(free_port()),
            loopback(free_port()),
        );
        for (n, node) in nodes.iter().enumerate() {
            let n = n + 1;
            config = config
                .replace(&format!("127.0.0.1:530{n}"), &node.starttls.to_string())
                .replace(&format!("127.0.0.1:531{n}"), &node.direct_tls.to_string())
                .replace(&format!("127.0.0.1:528{n}"), &node.http.to_string())
                .replace(
                    &format!("port 528{n}"),
                    &format!("port {}", node.http.port()),
                );
        }
        config = config
            .replace("bind 127.0.0.1:5222", &format!("bind {starttls}"))
            .replace("bind 127.0.0.1:5223", &format!("bind {direct_tls}"))
            .replace("bind 127.0.0.1:5280", &format!("bind {websocket}"));
        let dir = tempfile::tempdir().expect("a folder for haproxy");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("haproxy.cfg written");
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log file");
        // Debian installs it in /usr/sbin, which a user's PATH may lack.
        let binary = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or("haproxy");
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("haproxy is installed (Debian package haproxy)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(starttls).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        HaProxy {
            starttls,
            direct_tls,
            websocket,
            child,
            _dir: dir,
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
