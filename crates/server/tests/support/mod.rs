//! A server on a loopback port for the tests: a small CodiEsp-layout corpus imported into a
//! temp database, the retrieval engine fitted on it, an HTTP client that reports every status.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medcoder_assets::MedcoderHome;
use medcoder_server::config::ServeConfig;
use medcoder_store::{import_codiesp, CodiespOptions, Language, Store};
use serde_json::{json, Value};

/// The three kinds of note of the corpus, their text and their codes.
pub const THEMES: [(&str, &str); 3] = [
    (
        "Type 2 diabetes mellitus with poor glycemic control and polyuria; metformin was started.",
        "E11.9",
    ),
    (
        "Community acquired pneumonia of the right lower lobe with fever and productive cough; chest radiograph showed consolidation.",
        "J18.9",
    ),
    (
        "Fracture of the femoral neck after a fall at home; hip replacement surgery was performed.",
        "S72.009A",
    ),
];

pub struct Corpus {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub home: MedcoderHome,
}

/// The corpus in `<tmp>/c.duckdb`; the code sets from the usual home when installed (an empty
/// home otherwise: coding then goes without descriptions).
pub fn corpus() -> Corpus {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("codiesp");
    std::fs::create_dir_all(&src).unwrap();
    for (file, n, offset) in [("codiesp_train.jsonl", 6, 0), ("codiesp_dev.jsonl", 2, 100)] {
        let mut text = String::new();
        for i in 0..n {
            for (t, (note, code)) in THEMES.iter().enumerate() {
                let row = json!({
                    "id": format!("case-{}-{t}", i + offset),
                    "text_en": format!("Case {}. A patient of {} years. {note}", i + offset, 40 + i),
                    "text_es": "",
                    "diagnoses": [code.to_lowercase()],
                    "procedures": [],
                    "evidence": [],
                });
                text += &format!("{row}\n");
            }
        }
        std::fs::write(src.join(file), text).unwrap();
    }
    let db = dir.path().join("c.duckdb");
    let store = Store::open(&db).unwrap();
    import_codiesp(
        &store,
        &CodiespOptions {
            src,
            lang: Language::En,
            name: None,
            drop: false,
        },
    )
    .unwrap();
    drop(store);
    let home = MedcoderHome::from_env()
        .ok()
        .filter(|h| medcoder_icd::IcdSources::from_home(h).is_ok())
        .unwrap_or_else(|| {
            eprintln!("note: ICD assets not installed; coding without the code sets");
            MedcoderHome::at(dir.path().join("home"))
        });
    Corpus { dir, db, home }
}

impl Corpus {
    /// A config for the retrieval engine on this corpus, on a free loopback port.
    pub fn config(&self) -> ServeConfig {
        let mut config = ServeConfig {
            port: 0,
            ..ServeConfig::default()
        };
        config.engine.db = Some(self.db.clone());
        config.engine.dataset = Some("codiesp".into());
        // Without sentence embeddings: these tests are about HTTP behaviour (some send notes
        // of hundreds of thousands of characters), and the embedded retrieval engine is
        // tested in the coding crate and through the binary.
        config.engine.embedder = "none".into();
        config
    }
}

/// A running server; shut down (and waited for) on drop.
pub struct TestServer {
    pub address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts the server and, when `wait_ready`, waits until `/ready` answers 200.
    pub fn start(config: ServeConfig, home: &Path, wait_ready: bool) -> Self {
        let home = MedcoderHome::at(home.to_path_buf());
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let server = medcoder_server::bind(config, home).await.unwrap();
                address_tx.send(server.address).unwrap();
                server
                    .run(async {
                        let _ = shutdown_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let address = address_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let server = Self {
            address,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        if wait_ready {
            server.wait_ready();
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let (status, body) = get(&self.url("/ready"), None);
            if status == 200 {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "not ready after 120 s: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Signals shutdown and waits for the server to stop.
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// An answer: status, headers we look at, body.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub request_id: Option<String>,
    pub cors: Option<String>,
    pub content_type: Option<String>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = response.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (retry_after, request_id, cors, content_type) = (
        header("retry-after"),
        header("x-request-id"),
        header("access-control-allow-origin"),
        header("content-type"),
    );
    let mut body = String::new();
    response
        .body_mut()
        .as_reader()
        .read_to_string(&mut body)
        .unwrap();
    Answer {
        status: response.status().as_u16(),
        retry_after,
        request_id,
        cors,
        content_type,
        body,
    }
}

/// POST `body` with the given content type and headers.
pub fn post_with(
    url: &str,
    body: &str,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = agent().post(url);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.send(body))
}

pub fn post(url: &str, body: &Value) -> Answer {
    post_with(url, &body.to_string(), Some("application/json"), &[])
}

pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.call())
}

pub fn get(url: &str, bearer: Option<&str>) -> (u16, String) {
    let auth = bearer.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let a = get_with(url, &headers);
    (a.status, a.body)
}

/// POST a multipart form: `(name, filename, bytes)` parts.
pub fn post_multipart(url: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Answer {
    let boundary = "medcoder-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(file) => body.extend(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/pdf\r\n\r\n").as_bytes(),
            ),
            None => body.extend(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend(*bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    answer(
        agent()
            .post(url)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .send(&body[..]),
    )
}
