//! A real NATS JetStream server (Debian's nats-server) run by a test on
//! 127.0.0.1 of a test namespace, and a client reading its streams.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{TempDir, netns::Netns};

pub struct NatsServer {
    ns_name: String,
    pub port: u16,
    /// JetStream's store: kept across [`NatsServer::stop`] and
    /// [`NatsServer::start`].
    store: TempDir,
    log: PathBuf,
    /// A configuration file (users, permissions), if any.
    config: Option<PathBuf>,
    /// The address it listens on.
    addr: String,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a JetStream server in `ns` on a free port of its loopback.
    pub fn start_in(ns: &Netns) -> Self {
        Self::start_with_config(ns, None)
    }

    /// Like [`NatsServer::start_in`], with `config` (nats-server's
    /// configuration syntax) as its configuration file.
    pub fn start_with_config(ns: &Netns, config: Option<&str>) -> Self {
        Self::start_on(ns, config, "127.0.0.1")
    }

    /// Like [`NatsServer::start_with_config`], listening on `addr` of the
    /// namespace (`0.0.0.0`: every address of it).
    pub fn start_on(ns: &Netns, config: Option<&str>, addr: &str) -> Self {
        Self::start_at(ns, config, addr, free_port(ns))
    }

    /// Like [`NatsServer::start_on`], on `port`.
    pub fn start_at(ns: &Netns, config: Option<&str>, addr: &str, port: u16) -> Self {
        let store = TempDir::new("nats");
        let log = store.join("nats.log");
        let config = config.map(|text| {
            let path = store.join("nats.conf");
            std::fs::write(&path, text).expect("nats config");
            path
        });
        let mut server = NatsServer {
            ns_name: ns.name.clone(),
            port,
            store,
            log,
            config,
            addr: addr.to_string(),
            child: None,
        };
        server.start(ns);
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on its port and store; waits until it
    /// accepts connections.
    pub fn start(&mut self, ns: &Netns) {
        assert!(self.child.is_none(), "already running");
        assert_eq!(ns.name, self.ns_name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats log");
        let mut command = ns.command("nats-server");
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .args(["--jetstream", "--addr", &self.addr, "--port", &self.port.to_string()])
            .arg("--store_dir")
            .arg(self.store.join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (cargo xtask setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
        let addr = format!("127.0.0.1:{}", self.port);
        while ns.run(|| std::net::TcpStream::connect(&addr)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the node is gone at once (a crash).
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM (nats-server shuts down cleanly, its store kept), waits.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's log file (kept across restarts).
    pub fn log_file(&self) -> PathBuf {
        self.log.clone()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP port nothing listens on in `ns` (now).
pub fn free_port(ns: &Netns) -> u16 {
    ns.run(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    })
}

/// Three JetStream servers in `ns` clustered over loopback routes.
pub fn cluster_of_three(ns: &Netns) -> Vec<NatsServer> {
    let clients: Vec<u16> = (0..3).map(|_| free_port(ns)).collect();
    let routes: Vec<u16> = (0..3).map(|_| free_port(ns)).collect();
    (0..3)
        .map(|i| {
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("\"nats-route://127.0.0.1:{}\"", routes[j]))
                .collect();
            let config = format!(
                "server_name: n{i}\ncluster {{ name: netwatch-test, listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
                routes[i],
                others.join(", ")
            );
            NatsServer::start_at(ns, Some(&config), "127.0.0.1", clients[i])
        })
        .collect()
}

/// Every message of `stream` (oldest first) as JSON, read with a real
/// client from inside `ns`; an empty list when the stream does not exist.
pub fn stream_messages(ns: &Netns, url: &str, stream: &str) -> Vec<serde_json::Value> {
    stream_messages_as(ns, url, stream, None)
}

/// [`stream_messages`] as the user of the NKey `seed`.
pub fn stream_messages_as(ns: &Netns, url: &str, stream: &str, seed: Option<&str>) -> Vec<serde_json::Value> {
    let seed = seed.map(str::to_string);
    use async_nats::jetstream::{self, consumer::pull};
    use futures_util::StreamExt as _;
    let (url, stream_name) = (url.to_string(), stream.to_string());
    ns.run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut options = async_nats::ConnectOptions::new();
            if let Some(seed) = seed {
                options = options.nkey(seed);
            }
            let client = options.connect(url.as_str()).await.expect("connect to nats");
            let js = jetstream::new(client);
            let Ok(mut stream) = js.get_stream(&stream_name).await else {
                return Vec::new();
            };
            let total = stream.info().await.expect("stream info").state.messages as usize;
            // A cluster that just lost a node elects leaders again first.
            let deadline = Instant::now() + crate::patience(Duration::from_secs(60));
            let consumer = loop {
                match stream
                    .create_consumer(pull::Config {
                        ack_policy: jetstream::consumer::AckPolicy::None,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(consumer) => break consumer,
                    Err(err) if Instant::now() < deadline => {
                        eprintln!("creating a consumer: {err}; again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(err) => panic!("creating a consumer: {err}"),
                }
            };
            let mut out = Vec::new();
            while out.len() < total {
                let mut batch = consumer
                    .batch()
                    .max_messages(total - out.len())
                    .expires(Duration::from_secs(5))
                    .messages()
                    .await
                    .expect("batch");
                let before = out.len();
                while let Some(m) = batch.next().await {
                    let m = m.expect("message");
                    let mut v: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON message");
                    v["subject"] = m.subject.to_string().into();
                    out.push(v);
                }
                assert!(out.len() > before, "the stream stopped delivering");
            }
            out
        })
    })
}

/// A NATS user's NKey pair: the public key (for the server's
/// `authorization`) and the seed (for the client).
pub fn user_nkey() -> (String, String) {
    let pair = nkeys::KeyPair::new_user();
    (pair.public_key(), pair.seed().expect("a seed"))
}

/// `publish` permissions of a sensor that may write only as `sensor`:
/// its own subjects and the stream's info and creation, acknowledgements
/// to its inbox.
pub fn sensor_permissions(nkey: &str, sensor: &str) -> String {
    format!(
        "{{ nkey: \"{nkey}\", permissions: {{ publish: {{ allow: [\"netwatch.incidents.{sensor}.>\", \"$JS.API.STREAM.INFO.NETWATCH_INCIDENTS\", \"$JS.API.STREAM.CREATE.NETWATCH_INCIDENTS\"] }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }}"
    )
}

/// How many copies of `stream` the cluster keeps (its configuration) and
/// how many servers hold one (the leader and its replicas).
pub fn stream_copies(ns: &Netns, url: &str, stream: &str) -> (usize, usize) {
    let (url, stream_name) = (url.to_string(), stream.to_string());
    ns.run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = async_nats::connect(url.as_str()).await.expect("connect to nats");
            let js = async_nats::jetstream::new(client);
            let mut stream = js.get_stream(&stream_name).await.expect("the stream");
            let info = stream.info().await.expect("stream info");
            let cluster = info.cluster.as_ref().expect("a clustered stream");
            (
                info.config.num_replicas,
                usize::from(cluster.leader.is_some()) + cluster.replicas.len(),
            )
        })
    })
}

/// Publishes `messages` (subject, JSON) to their stream from inside `ns`,
/// waiting for every acknowledgement.
pub fn publish_all(ns: &Netns, url: &str, messages: Vec<(String, serde_json::Value)>) {
    let url = url.to_string();
    ns.run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = async_nats::connect(url.as_str()).await.expect("connect to nats");
            let js = async_nats::jetstream::new(client);
            let mut acks = Vec::new();
            for (subject, payload) in messages {
                acks.push(
                    js.publish(subject, serde_json::to_vec(&payload).unwrap().into())
                        .await
                        .expect("publish"),
                );
            }
            for ack in acks {
                ack.await.expect("acknowledged");
            }
        })
    })
}
