//! A stand-in for an OpenAI-compatible endpoint in tests: a minimal HTTP/1.1 server on
//! 127.0.0.1 (one thread, one request per connection) that answers `POST …/chat/completions`
//! with what the test's handler returns for the n-th request, and keeps the request bodies.
//! Used by the openai engine's unit tests and the CLI's end-to-end tests (`#[path]`).
#![allow(dead_code, clippy::unwrap_used)] // each user takes a subset; a panic fails the test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    pub fn new(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    pub fn ok(body: String) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A chat completion whose answer is `content`.
pub fn chat_completion(content: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": "stub-model",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
    })
    .to_string()
}

type Handler = dyn Fn(usize, &str) -> Reply + Send + Sync;

#[derive(Debug)]
pub struct StubServer {
    port: u16,
    /// (request line and headers, body) of each request.
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

impl StubServer {
    /// Serves until the test process ends; `handler(n, body)` answers the n-th request (from 0).
    pub fn start(handler: impl Fn(usize, &str) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let handler: Box<Handler> = Box::new(handler);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // A client that hung up mid-request is no reason to stop serving.
                let _ = serve(stream, &seen, handler.as_ref());
            }
        });
        Self { port, requests }
    }

    /// `http://127.0.0.1:PORT/v1`, as a client's base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The bodies of the requests so far.
    pub fn requests(&self) -> Vec<String> {
        let requests = self.requests.lock().unwrap();
        requests.iter().map(|(_, body)| body.clone()).collect()
    }

    /// The request lines and headers of the requests so far.
    pub fn heads(&self) -> Vec<String> {
        let requests = self.requests.lock().unwrap();
        requests.iter().map(|(head, _)| head.clone()).collect()
    }
}

fn serve(
    stream: TcpStream,
    seen: &Mutex<Vec<(String, String)>>,
    handler: &Handler,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut content_length = 0;
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut head = request_line.clone();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        head += &line;
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.push((head, body.clone()));
        seen.len() - 1
    };
    let reply = if request_line.starts_with("POST ") && request_line.contains("/chat/completions") {
        handler(n, &body)
    } else {
        Reply::new(404, r#"{"error":{"message":"no such route"}}"#)
    };
    let mut response = format!(
        "HTTP/1.1 {} Stub\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        response += &format!("{name}: {value}\r\n");
    }
    response += "\r\n";
    let mut stream = stream;
    stream.write_all(response.as_bytes())?;
    stream.write_all(reply.body.as_bytes())?;
    stream.flush()
}

/// A base URL where nothing listens (a port just bound and released).
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}
