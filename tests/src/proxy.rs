//! A TCP proxy the tests can cut, standing between Pictor and RabbitMQ or Redis, so a test can
//! take a dependency "down" for its own app without stopping the shared service that parallel
//! tests use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

pub struct CuttableProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    muted: Arc<AtomicBool>,
    connections: Arc<Mutex<JoinSet<()>>>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    /// Starts a proxy on a random local port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let muted = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let accept_task = tokio::spawn({
            let cut = cut.clone();
            let muted = muted.clone();
            let connections = connections.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let muted = muted.clone();
                    connections.lock().await.spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(upstream).await {
                            forward(inbound, outbound, muted).await;
                        }
                    });
                }
            }
        });
        Self {
            addr,
            cut,
            muted,
            connections,
            accept_task,
        }
    }

    /// Holds back whatever the dependency sends (it still receives everything) until
    /// [`Self::unmute`], or for good if the proxy is cut first: a broker that takes a message
    /// and whose confirm never arrives.
    pub fn mute(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }

    pub fn unmute(&self) {
        self.muted.store(false, Ordering::SeqCst);
    }

    /// Drops every open connection and refuses new ones, like a dead dependency.
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.connections.lock().await.abort_all();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Copies both ways, each direction closed when its reader ends; the dependency's side waits
/// while `muted`.
async fn forward(inbound: TcpStream, outbound: TcpStream, muted: Arc<AtomicBool>) {
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut upstream_read, mut upstream_write) = outbound.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
    };
    let down = async {
        let mut buffer = vec![0_u8; 16 * 1024];
        while let Ok(read) = upstream_read.read(&mut buffer).await {
            if read == 0 {
                break;
            }
            while muted.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if client_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}
