//! [`FaultProxy`]: a loopback TCP proxy in front of a nats-server that a test
//! switches between passing traffic, refusing connections (fast failure) and
//! black-holing them (open connections, no bytes either way: timeouts).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards bytes both ways.
    Pass,
    /// Closes the open connections and every new one at once.
    Refuse,
    /// Keeps connections open but drops every byte, both ways.
    BlackHole,
}

/// A proxy on a free loopback port; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`nats://host:port`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("nats://")
            .parse()
            .expect("upstream host:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Pass);
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (modes, registry) = (mode.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = modes.subscribe();
                if *rx.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                let handle = tokio::spawn(relay(client, upstream, rx));
                registry.lock().unwrap().push(handle);
            }
        });
        tasks.lock().unwrap().push(accept);
        FaultProxy { addr, mode, tasks }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Switches the mode; `Refuse` closes every open connection at once.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// One client connection: copies both ways while passing, drops bytes while
/// black-holed, ends when refused or either side closes.
async fn relay(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Mode::Refuse {
                    return;
                }
            }
            read = client_read.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *mode.borrow() == Mode::Pass && server_write.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            read = server_read.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *mode.borrow() == Mode::Pass && client_write.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}
