//! `LinkProxy`: a test-only TCP proxy on the inter-site link (site B's leafnode remote → site A's
//! leaf port), the Rust twin of testkit's `TestLinkProxy` in its `reset` mode. It forwards bytes
//! both ways until `partition()` closes every connection and turns new ones away, so both servers
//! see the link go at once while they, and every client of theirs, stay up; `heal()` lets B redial.
//! It exists because this kernel has no netem and two servers on loopback cannot otherwise be cut
//! apart (shared/ENVIRONMENT.md); it is a fault injector for tests, never a transport.
//!
//! Only `reset`: a silent blackhole is noticed through the servers' pings (3 × 10 s here), too slow
//! for these tests. Every thread it starts ends, and is joined, on `Drop`.

use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct LinkProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    partitioned: bool,
    closing: bool,
    next_id: u64,
    /// Open connections: (id, downstream, upstream), clones of what the copy threads hold.
    pipes: Vec<(u64, TcpStream, TcpStream)>,
    threads: Vec<JoinHandle<()>>,
}

fn close(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Both);
}

impl LinkProxy {
    /// Listen on a kernel-chosen loopback port and forward every connection to `target_port`.
    pub fn start(target_port: u16) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            target: SocketAddr::from(([127, 0, 0, 1], target_port)),
            state: Mutex::new(State::default()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(listener, shared))
        };
        LinkProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port B dials (and A advertises).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Close every connection and refuse new ones until `heal()`.
    pub fn partition(&self) {
        let mut st = self.shared.state.lock().unwrap();
        st.partitioned = true;
        for (_, down, up) in st.pipes.drain(..) {
            close(&down);
            close(&up);
        }
    }

    /// Forward new connections again.
    pub fn heal(&self) {
        self.shared.state.lock().unwrap().partitioned = false;
    }

    /// Connections currently forwarded.
    pub fn connections(&self) -> usize {
        self.shared.state.lock().unwrap().pipes.len()
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock().unwrap();
            st.closing = true;
            for (_, down, up) in st.pipes.drain(..) {
                close(&down);
                close(&up);
            }
        }
        // Wake the blocking accept so that it sees `closing`.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut self.shared.state.lock().unwrap().threads);
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let down = match conn {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                if shared.state.lock().unwrap().closing {
                    return;
                }
                continue;
            }
        };
        {
            let st = shared.state.lock().unwrap();
            if st.closing {
                return;
            }
            if st.partitioned {
                close(&down);
                continue;
            }
        }
        let Ok(up) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(2)) else {
            close(&down);
            continue;
        };
        let _ = (down.set_nodelay(true), up.set_nodelay(true));
        let mut st = shared.state.lock().unwrap();
        // A partition may have come while this one was dialling.
        if st.partitioned || st.closing {
            close(&down);
            close(&up);
            continue;
        }
        let id = st.next_id;
        st.next_id += 1;
        let pipe = (id, down.try_clone().unwrap(), up.try_clone().unwrap());
        let back = (up.try_clone().unwrap(), down.try_clone().unwrap());
        st.pipes.push(pipe);
        st.threads.push(pump(shared.clone(), id, down, up));
        st.threads.push(pump(shared.clone(), id, back.0, back.1));
    }
}

/// Copy `from` → `to` until either side closes, then close the whole connection.
fn pump(shared: Arc<Shared>, id: u64, mut from: TcpStream, mut to: TcpStream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        close(&from);
        close(&to);
        shared
            .state
            .lock()
            .unwrap()
            .pipes
            .retain(|(i, _, _)| *i != id);
    })
}
