//! AWS for the tests of the AWS Secrets Manager value provider and of
//! `rekey-lambda`, the Secrets Manager rotation function: moto's
//! `moto_server` standing in for Secrets Manager (and the rest of AWS) on
//! a free port, and a stand-in for the Lambda Runtime API that hands a
//! custom-runtime binary the events a test queues and records what it
//! answers.
//!
//! `./scripts/test` installs `moto_server` (see [`moto_binary`]). Moto does
//! not check signatures (any access key works), but it reads the credential
//! scope of the `Authorization` header: the service named there routes the
//! request (one without the header goes to S3), and the region there is
//! the region its resources live in.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::process::{free_port, next_seq, random_hex, random_uuid, tool_binary};

/// How long `moto_server` gets to answer.
const READY: Duration = Duration::from_secs(60);

/// The region [`Moto::env`] names.
const REGION: &str = "eu-west-1";

/// The function the Lambda stand-in runs.
const FUNCTION_NAME: &str = "rekey-rotation";

/// Its ARN (`Lambda-Runtime-Invoked-Function-Arn`).
const FUNCTION_ARN: &str = "arn:aws:lambda:eu-west-1:123456789012:function:rekey-rotation";

/// How long an invocation may run (`Lambda-Runtime-Deadline-Ms`).
const INVOCATION_DEADLINE: Duration = Duration::from_secs(60);

/// The longest head and body an HTTP message here may have.
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

/// moto's `moto_server`: `$MOTO_SERVER` when set; else the one
/// `./scripts/test` installs, `target/tools/venv/bin/moto_server` in the
/// workspace (`venv/bin/moto_server` under `$REKEY_TOOLS_DIR` when that is
/// set); else `moto_server` on the `PATH`.
///
/// # Panics
///
/// When there is none.
#[must_use]
pub fn moto_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| tool_binary("moto_server", "MOTO_SERVER"))
        .clone()
}

/// A running `moto_server` on 127.0.0.1, in memory, killed on drop. Every
/// service answers at [`Moto::endpoint`]; [`Moto::env`] points an AWS SDK
/// at it.
pub struct Moto {
    child: Option<Child>,
    port: u16,
    log_path: PathBuf,
}

impl Moto {
    /// Starts `moto_server` on a free port (its stdout and stderr to
    /// `moto-N.log` in `dir`) and waits until it answers HTTP. Tries new
    /// ports when one was taken in the meantime.
    ///
    /// # Panics
    ///
    /// When it exits first or does not answer within a minute (with its
    /// log).
    #[must_use]
    pub fn start(dir: &Path) -> Moto {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let log_path = dir.join(format!("moto-{}.log", next_seq()));
            let log = std::fs::File::create(&log_path)
                .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
            let child = Command::new(moto_binary())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // moto names its own address with MOTO_PORT; one inherited
                // from the caller would name another server.
                .env("MOTO_PORT", port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", moto_binary().display()));
            let mut moto = Moto {
                child: Some(child),
                port,
                log_path,
            };
            match moto.wait_ready() {
                Ok(()) => return moto,
                Err(log)
                    if attempt < 5 && log.to_lowercase().contains("address already in use") => {}
                Err(log) => panic!("moto_server did not start: {log}"),
            }
        }
    }

    /// Waits until the server answers HTTP: `Err(log)` when it exits
    /// first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY;
        let addr = self.addr();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("exited with {status}; log:\n{}", self.log()));
            }
            if http(&addr, "GET", "/moto-api/", &[], b"").is_some() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "moto_server at {} did not answer within {READY:?}; log:\n{}",
                self.endpoint(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:PORT`.
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`, the endpoint of every service.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The server's log (stdout and stderr) so far: one line per request.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// What a process using an AWS SDK needs to reach this server: static
    /// test credentials, the region `eu-west-1`, `AWS_ENDPOINT_URL` (every
    /// service at [`Moto::endpoint`]) and no instance metadata lookups.
    #[must_use]
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Forgets every resource of every service (`POST /moto-api/reset`).
    ///
    /// # Panics
    ///
    /// When moto does not answer 200.
    pub fn reset(&self) {
        match http(&self.addr(), "POST", "/moto-api/reset", &[], b"") {
            Some((200, _)) => {}
            other => panic!(
                "POST /moto-api/reset at {}: {:?}; log:\n{}",
                self.endpoint(),
                other.map(|(status, body)| (status, String::from_utf8_lossy(&body).to_string())),
                self.log()
            ),
        }
    }
    /// Calls the Secrets Manager action `action` (`CreateSecret`,
    /// `GetSecretValue`, `DescribeSecret`, ...) with the JSON `request`
    /// in `eu-west-1`, as an SDK configured with [`Moto::env`] would: the
    /// response, or `Err` with moto's error object (`__type`, `message`).
    ///
    /// # Panics
    ///
    /// When moto does not answer, or answers something else than JSON.
    pub fn secrets_manager(
        &self,
        action: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let target = format!("secretsmanager.{action}");
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=testing/20240101/{REGION}/secretsmanager/aws4_request, \
             SignedHeaders=host, Signature=0"
        );
        let headers = [
            ("X-Amz-Target", target.as_str()),
            ("Content-Type", "application/x-amz-json-1.1"),
            ("Authorization", auth.as_str()),
        ];
        let body = request.to_string();
        let (status, body) = http(&self.addr(), "POST", "/", &headers, body.as_bytes())
            .unwrap_or_else(|| {
                panic!(
                    "moto at {} did not answer {target}; log:\n{}",
                    self.endpoint(),
                    self.log()
                )
            });
        let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "moto answered {target} with {status} and no JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        if status == 200 { Ok(json) } else { Err(json) }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The ARN of the function the stand-in pretends to be, for
/// `RotateSecret`'s `RotationLambdaARN`.
pub const ROTATION_LAMBDA_ARN: &str = FUNCTION_ARN;

/// A `rekey-lambda` process polling a [`LambdaRuntime`], with
/// credentials for a [`Moto`] and the given `REKEY_*` settings and nothing
/// else from the caller's environment; killed on drop.
pub struct LambdaFunction {
    child: Option<Child>,
    log_path: PathBuf,
    pub started: Instant,
}

impl LambdaFunction {
    /// Starts `rekey-lambda` (its JSON log lines to `lambda-N.log` in
    /// `dir`).
    ///
    /// # Panics
    ///
    /// When it cannot be spawned.
    #[must_use]
    pub fn start(
        dir: &Path,
        runtime: &LambdaRuntime,
        moto: &Moto,
        settings: &[(&str, &str)],
    ) -> LambdaFunction {
        let log_path = dir.join(format!("lambda-{}.log", next_seq()));
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let mut cmd = Command::new(crate::LAMBDA.path());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(runtime.function_env())
            .envs(moto.env())
            .envs(settings.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn rekey-lambda: {e}"));
        LambdaFunction {
            child: Some(child),
            log_path,
            started,
        }
    }

    /// What it logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for LambdaFunction {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How an invocation failed: the `errorType` and `errorMessage` the
/// function posted to `/invocation/{id}/error` (or, after a failed start,
/// to `/init/error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LambdaError {
    /// `errorType` (else the `Lambda-Runtime-Function-Error-Type` header).
    pub error_type: String,
    /// `errorMessage` (else the whole body).
    pub message: String,
}

impl LambdaError {
    /// From a posted error body, falling back on the
    /// `Lambda-Runtime-Function-Error-Type` header and the raw text.
    fn from_body(body: &[u8], header_type: Option<&str>, default_type: &str) -> LambdaError {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let field = |k: &str| {
            json.as_ref()
                .and_then(|j| j[k].as_str())
                .map(str::to_string)
        };
        LambdaError {
            error_type: field("errorType")
                .or_else(|| header_type.map(str::to_string))
                .unwrap_or_else(|| default_type.to_string()),
            message: field("errorMessage")
                .unwrap_or_else(|| String::from_utf8_lossy(body).to_string()),
        }
    }
}

/// A stand-in for the AWS Lambda Runtime API (version 2018-06-01) on
/// 127.0.0.1, for a custom-runtime binary started with
/// [`LambdaRuntime::function_env`]: `GET /runtime/invocation/next` waits
/// until [`LambdaRuntime::invoke`] queues an event, and the function's
/// `/response` or `/error` for it is what `invoke` returns. Plain HTTP/1.1
/// with keep-alive, one thread per connection; stopped on drop.
pub struct LambdaRuntime {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the test and the connections share.
struct Shared {
    state: Mutex<State>,
    /// Signalled on every change of `state`.
    changed: Condvar,
    /// Every connection (a handle to shut it down) and its thread.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

#[derive(Default)]
struct State {
    /// Queued events not handed out yet: (request id, event JSON).
    queue: VecDeque<(String, String)>,
    /// Handed out and not answered yet.
    in_flight: HashSet<String>,
    /// Answers not collected yet, with when they came.
    answers: HashMap<String, (Result<serde_json::Value, LambdaError>, Instant)>,
    init_error: Option<serde_json::Value>,
    first_poll: Option<Instant>,
    /// (queued, answered) of every invocation `invoke` collected.
    timings: Vec<(Instant, Instant)>,
    stopping: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LambdaRuntime {
    /// Starts the stand-in on a free port of 127.0.0.1.
    ///
    /// # Panics
    ///
    /// When no port can be bound.
    #[must_use]
    pub fn start() -> LambdaRuntime {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the Lambda Runtime API");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            conns: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("lambda-runtime-api".into())
                .spawn(move || accept(&listener, &shared))
                .expect("spawn the Lambda Runtime API thread")
        };
        LambdaRuntime {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:PORT`, the value of `AWS_LAMBDA_RUNTIME_API`.
    #[must_use]
    pub fn api(&self) -> String {
        self.addr.to_string()
    }

    /// The environment Lambda gives a function, as much as the
    /// `lambda_runtime` crate reads at start: `AWS_LAMBDA_RUNTIME_API`,
    /// `AWS_LAMBDA_FUNCTION_NAME`, `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` and
    /// `AWS_LAMBDA_FUNCTION_VERSION` (it panics without them), and the log
    /// group and stream names. No region or credentials: add
    /// [`Moto::env`].
    #[must_use]
    pub fn function_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_LAMBDA_RUNTIME_API", self.api()),
            ("AWS_LAMBDA_FUNCTION_NAME", FUNCTION_NAME.to_string()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128".to_string()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_string()),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME",
                format!("rekey-test/[$LATEST]{}", random_hex(16)),
            ),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{FUNCTION_NAME}"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Queues `event` for the function's next `GET /invocation/next` and
    /// waits for its answer: the body the function posted to `/response`,
    /// or the error it posted to `/error`. Once the function has posted an
    /// init error, every invocation fails with it, as on Lambda.
    ///
    /// # Panics
    ///
    /// When there is no answer within `timeout` (saying whether the
    /// function took the event at all).
    pub fn invoke(
        &self,
        event: serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, LambdaError> {
        let id = random_uuid();
        let queued_at = Instant::now();
        let deadline = queued_at + timeout;
        let mut st = self.shared.lock();
        st.queue.push_back((id.clone(), event.to_string()));
        self.shared.changed.notify_all();
        loop {
            if let Some((result, answered_at)) = st.answers.remove(&id) {
                st.timings.push((queued_at, answered_at));
                return result;
            }
            if let Some(init) = &st.init_error {
                let err =
                    LambdaError::from_body(init.to_string().as_bytes(), None, "Runtime.InitError");
                st.queue.retain(|(i, _)| *i != id);
                st.in_flight.remove(&id);
                return Err(err);
            }
            let now = Instant::now();
            if now >= deadline {
                let taken = st.in_flight.remove(&id);
                st.queue.retain(|(i, _)| *i != id);
                let polled = st.first_poll.is_some();
                drop(st);
                let why = if taken {
                    "the function took the event but posted neither a response nor an error"
                } else if polled {
                    "the function did not ask for the next event"
                } else {
                    "no function ever asked for an event"
                };
                panic!(
                    "Lambda invocation {id} got no answer within {timeout:?}: {why} \
                     (AWS_LAMBDA_RUNTIME_API={})",
                    self.api()
                );
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// What the function posted to `/runtime/init/error`, if anything.
    #[must_use]
    pub fn init_error(&self) -> Option<serde_json::Value> {
        self.shared.lock().init_error.clone()
    }

    /// When the first `GET /invocation/next` arrived: the function is up.
    #[must_use]
    pub fn first_poll(&self) -> Option<Instant> {
        self.shared.lock().first_poll
    }

    /// From queueing the last invocation [`LambdaRuntime::invoke`]
    /// returned to the arrival of its answer.
    #[must_use]
    pub fn last_latency(&self) -> Option<Duration> {
        self.latencies().last().copied()
    }

    /// [`LambdaRuntime::last_latency`] of every invocation so far, oldest
    /// first.
    #[must_use]
    pub fn latencies(&self) -> Vec<Duration> {
        self.shared
            .lock()
            .timings
            .iter()
            .map(|(queued, answered)| answered.saturating_duration_since(*queued))
            .collect()
    }
}

impl Drop for LambdaRuntime {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.changed.notify_all();
        // Wakes the blocking accept, which then sees `stopping`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns = std::mem::take(
            &mut *self
                .shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (stream, thread) in conns {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
    }
}

/// Accepts connections until the runtime stops, a thread for each.
fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.lock().stopping {
            return;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let thread = {
            let shared = Arc::clone(shared);
            std::thread::Builder::new()
                .name("lambda-runtime-conn".into())
                .spawn(move || serve(stream, &shared))
        };
        if let Ok(thread) = thread {
            let mut conns = shared.conns.lock().unwrap_or_else(PoisonError::into_inner);
            conns.retain(|(_, t)| !t.is_finished());
            conns.push((handle, thread));
        }
    }
}

/// An HTTP response of the stand-in.
struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// The invocation a `GET /next` hands out: put back in the queue when
    /// the response cannot be written.
    delivers: Option<(String, String)>,
}

impl Response {
    fn json(status: u16, body: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: body.to_string().into_bytes(),
            delivers: None,
        }
    }

    fn error(status: u16, error_type: &str, message: &str) -> Response {
        Response::json(
            status,
            &serde_json::json!({"errorType": error_type, "errorMessage": message}),
        )
    }

    fn accepted() -> Response {
        Response::json(202, &serde_json::json!({"status": "OK"}))
    }

    fn write(&self, out: &mut TcpStream, close: bool) -> io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            202 => "Accepted",
            400 => "Bad Request",
            404 => "Not Found",
            _ => "",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut msg = head.into_bytes();
        msg.extend_from_slice(&self.body);
        out.write_all(&msg)?;
        out.flush()
    }
}

/// Serves the requests of one connection, keep-alive, until the client
/// closes it, asks to close it, or the runtime stops.
fn serve(stream: TcpStream, shared: &Shared) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    loop {
        let Some((start, headers)) = read_head(&mut reader) else {
            return;
        };
        let mut parts = start.split_whitespace();
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            let _ = Response::error(400, "InvalidRequest", "malformed request line")
                .write(&mut out, true);
            return;
        };
        let Ok(body) = read_body(&mut reader, &headers, false) else {
            let _ = Response::error(400, "InvalidRequest", "unreadable request body")
                .write(&mut out, true);
            return;
        };
        let close = version == "HTTP/1.0"
            || header(&headers, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let path = target.split('?').next().unwrap_or(target);
        let Some(response) = route(shared, method, path, &headers, &body, &out) else {
            return;
        };
        if response.write(&mut out, close).is_err() {
            if let Some(invocation) = response.delivers {
                let mut st = shared.lock();
                st.in_flight.remove(&invocation.0);
                st.queue.push_front(invocation);
                shared.changed.notify_all();
            }
            return;
        }
        if close {
            return;
        }
    }
}

/// The response to one request; `None` when the connection is to be
/// dropped (the runtime stops, or the client left during a long poll).
fn route(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    conn: &TcpStream,
) -> Option<Response> {
    const INVOCATION: &str = "/2018-06-01/runtime/invocation/";
    if method == "GET" && path == "/2018-06-01/runtime/invocation/next" {
        return next_invocation(shared, conn);
    }
    if method == "POST" && path == "/2018-06-01/runtime/init/error" {
        let value = serde_json::from_slice(body)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).to_string().into());
        shared.lock().init_error = Some(value);
        shared.changed.notify_all();
        return Some(Response::accepted());
    }
    if method == "POST"
        && let Some(rest) = path.strip_prefix(INVOCATION)
    {
        let result = if let Some(id) = rest.strip_suffix("/response") {
            let value = serde_json::from_slice(body)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).to_string().into());
            Some((id, Ok(value)))
        } else {
            rest.strip_suffix("/error").map(|id| {
                let header_type = header(headers, "lambda-runtime-function-error-type");
                (
                    id,
                    Err(LambdaError::from_body(body, header_type, "Unknown")),
                )
            })
        };
        if let Some((id, result)) = result {
            let mut st = shared.lock();
            if !st.in_flight.remove(id) {
                return Some(Response::error(
                    400,
                    "InvalidRequestID",
                    "no invocation with this request ID awaits an answer",
                ));
            }
            st.answers.insert(id.to_string(), (result, Instant::now()));
            shared.changed.notify_all();
            return Some(Response::accepted());
        }
    }
    Some(Response::error(
        404,
        "NotFound",
        &format!("no such endpoint: {method} {path}"),
    ))
}

/// `GET /invocation/next`: waits until an event is queued and hands it
/// out with the headers Lambda sends.
fn next_invocation(shared: &Shared, conn: &TcpStream) -> Option<Response> {
    let mut st = shared.lock();
    st.first_poll.get_or_insert_with(Instant::now);
    loop {
        if st.stopping {
            return None;
        }
        if let Some((id, event)) = st.queue.pop_front() {
            st.in_flight.insert(id.clone());
            drop(st);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970");
            let deadline = (now + INVOCATION_DEADLINE).as_millis();
            let trace = format!(
                "Root=1-{:08x}-{};Parent={};Sampled=0",
                now.as_secs(),
                random_hex(12),
                random_hex(8)
            );
            return Some(Response {
                status: 200,
                headers: vec![
                    ("Content-Type", "application/json".into()),
                    ("Lambda-Runtime-Aws-Request-Id", id.clone()),
                    ("Lambda-Runtime-Deadline-Ms", deadline.to_string()),
                    ("Lambda-Runtime-Invoked-Function-Arn", FUNCTION_ARN.into()),
                    ("Lambda-Runtime-Trace-Id", trace),
                ],
                body: event.clone().into_bytes(),
                delivers: Some((id, event)),
            });
        }
        st = shared
            .changed
            .wait_timeout(st, Duration::from_millis(100))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        // A function killed during the poll must not take the next event
        // with it.
        if peer_closed(conn) {
            return None;
        }
    }
}

/// Whether the client closed the connection (nothing more to read).
fn peer_closed(conn: &TcpStream) -> bool {
    if conn.set_nonblocking(true).is_err() {
        return true;
    }
    let r = conn.peek(&mut [0u8; 1]);
    let _ = conn.set_nonblocking(false);
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// The value of header `name` (case-insensitive).
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One line without its CRLF; `None` at the end of the stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = String::new();
    if reader.by_ref().take(MAX_HEAD as u64).read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

/// The start line and headers of the next HTTP message; `None` when the
/// connection ends or the head is malformed.
fn read_head(reader: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    let mut start = String::new();
    while start.is_empty() {
        start = read_line(reader).ok()??;
    }
    let mut headers = Vec::new();
    let mut size = start.len();
    loop {
        let line = read_line(reader).ok()??;
        if line.is_empty() {
            return Some((start, headers));
        }
        size += line.len();
        if size > MAX_HEAD {
            return None;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
}

/// The body of a message with these headers: chunked, sized by
/// `Content-Length`, or (a response without either) up to the end of the
/// stream; a request without either has none.
fn read_body(
    reader: &mut impl BufRead,
    headers: &[(String, String)],
    to_eof: bool,
) -> io::Result<Vec<u8>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    if header(headers, "transfer-encoding").is_some_and(|t| t.to_lowercase().contains("chunked")) {
        loop {
            let line = read_line(reader)?.ok_or_else(|| invalid("truncated chunk"))?;
            let hex = line.split(';').next().unwrap_or("").trim();
            let n = usize::from_str_radix(hex, 16).map_err(|_| invalid("bad chunk size"))?;
            if n == 0 {
                // Trailers, up to the empty line.
                while !read_line(reader)?
                    .ok_or_else(|| invalid("truncated trailers"))?
                    .is_empty()
                {}
                return Ok(body);
            }
            if body.len() + n > MAX_BODY {
                return Err(invalid("body too large"));
            }
            let start = body.len();
            body.resize(start + n, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(reader)?;
        }
    } else if let Some(len) = header(headers, "content-length") {
        let n: usize = len.parse().map_err(|_| invalid("bad Content-Length"))?;
        if n > MAX_BODY {
            return Err(invalid("body too large"));
        }
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    } else if to_eof {
        reader
            .by_ref()
            .take(MAX_BODY as u64)
            .read_to_end(&mut body)?;
    }
    Ok(body)
}

/// One plain HTTP/1.1 request to `addr` (`HOST:PORT`) on a connection of
/// its own: (status, body), or `None` when nothing answers.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    let sock: SocketAddr = addr.parse().ok()?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" || !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut msg = req.into_bytes();
    msg.extend_from_slice(body);
    (&stream).write_all(&msg).ok()?;
    let mut reader = BufReader::new(stream);
    let (status_line, headers) = read_head(&mut reader)?;
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let body = read_body(&mut reader, &headers, true).ok()?;
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{TempDir, wait_for};
    use serde_json::json;

    /// A keep-alive client, as the `lambda_runtime` crate's is.
    struct Client {
        reader: BufReader<TcpStream>,
        out: TcpStream,
    }

    impl Client {
        fn connect(api: &str) -> Client {
            let out = TcpStream::connect(api).expect("connect to the Lambda Runtime API");
            out.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("read timeout");
            Client {
                reader: BufReader::new(out.try_clone().expect("clone")),
                out,
            }
        }

        /// Sends a request (the body chunked when `chunked`); (status,
        /// headers, body).
        fn request(
            &mut self,
            method: &str,
            path: &str,
            extra: &[(&str, &str)],
            body: &[u8],
            chunked: bool,
        ) -> (u16, Vec<(String, String)>, Vec<u8>) {
            let mut req = format!("{method} {path} HTTP/1.1\r\nHost: lambda\r\n");
            for (k, v) in extra {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            let msg = if chunked {
                req.push_str("Transfer-Encoding: chunked\r\n\r\n");
                let mut m = req.into_bytes();
                for part in body.chunks(5) {
                    m.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    m.extend_from_slice(part);
                    m.extend_from_slice(b"\r\n");
                }
                m.extend_from_slice(b"0\r\n\r\n");
                m
            } else {
                req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                let mut m = req.into_bytes();
                m.extend_from_slice(body);
                m
            };
            self.out.write_all(&msg).expect("send");
            let (status, headers) = read_head(&mut self.reader).expect("a response");
            let status = status
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("a status");
            let body = read_body(&mut self.reader, &headers, false).expect("a body");
            (status, headers, body)
        }

        fn next(&mut self) -> (String, serde_json::Value) {
            let (status, headers, body) = self.request(
                "GET",
                "/2018-06-01/runtime/invocation/next",
                &[],
                b"",
                false,
            );
            assert_eq!(status, 200);
            let deadline: u128 = header(&headers, "lambda-runtime-deadline-ms")
                .expect("deadline")
                .parse()
                .expect("deadline in ms");
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_millis();
            assert!(deadline > now + 50_000 && deadline <= now + 60_000);
            assert_eq!(
                header(&headers, "lambda-runtime-invoked-function-arn"),
                Some(FUNCTION_ARN)
            );
            assert!(
                header(&headers, "lambda-runtime-trace-id")
                    .is_some_and(|t| t.starts_with("Root=1-"))
            );
            assert_eq!(header(&headers, "content-type"), Some("application/json"));
            let id = header(&headers, "lambda-runtime-aws-request-id")
                .expect("request id")
                .to_string();
            (id, serde_json::from_slice(&body).expect("a JSON event"))
        }
    }

    #[test]
    fn aws_lambda_invoke_returns_the_response() {
        let rt = LambdaRuntime::start();
        let api = rt.api();
        assert!(
            rt.function_env()
                .contains(&("AWS_LAMBDA_RUNTIME_API".to_string(), api.clone()))
        );
        let function = std::thread::spawn(move || {
            let mut c = Client::connect(&api);
            // The poll waits until the test queues an event.
            let (id, event) = c.next();
            assert_eq!(event, json!({"Step": "createSecret", "SecretId": "app"}));
            let (status, _, _) = c.request(
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/response"),
                &[("Content-Type", "application/json")],
                br#"{"done":true}"#,
                false,
            );
            assert_eq!(status, 202);
            // The same connection goes on: a second answer and an unknown
            // path are refused.
            let (status, _, body) = c.request(
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/response"),
                &[],
                b"{}",
                false,
            );
            assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
            let (status, _, _) = c.request("GET", "/2018-06-01/runtime/nope", &[], b"", false);
            assert_eq!(status, 404);
        });
        wait_for("the first poll", Duration::from_secs(10), || {
            rt.first_poll().is_some()
        });
        std::thread::sleep(Duration::from_millis(50));
        let answer = rt.invoke(
            json!({"Step": "createSecret", "SecretId": "app"}),
            Duration::from_secs(10),
        );
        assert_eq!(answer, Ok(json!({"done": true})));
        assert!(
            rt.last_latency()
                .is_some_and(|l| l < Duration::from_secs(10))
        );
        function.join().expect("the function thread");
        assert_eq!(rt.latencies().len(), 1);
    }

    #[test]
    fn aws_lambda_invoke_returns_the_error() {
        let rt = LambdaRuntime::start();
        let api = rt.api();
        let function = std::thread::spawn(move || {
            let mut c = Client::connect(&api);
            for _ in 0..2 {
                let (id, _) = c.next();
                let (status, _, _) = c.request(
                    "POST",
                    &format!("/2018-06-01/runtime/invocation/{id}/error"),
                    &[("Lambda-Runtime-Function-Error-Type", "unhandled")],
                    br#"{"errorType":"ResourceNotFoundException","errorMessage":"no such secret"}"#,
                    true,
                );
                assert_eq!(status, 202);
            }
        });
        for _ in 0..2 {
            let err = rt
                .invoke(json!({"Step": "setSecret"}), Duration::from_secs(10))
                .expect_err("an error");
            assert_eq!(
                err,
                LambdaError {
                    error_type: "ResourceNotFoundException".into(),
                    message: "no such secret".into()
                }
            );
        }
        function.join().expect("the function thread");
    }

    #[test]
    fn aws_lambda_init_error_fails_every_invocation() {
        let rt = LambdaRuntime::start();
        let mut c = Client::connect(&rt.api());
        let (status, _, _) = c.request(
            "POST",
            "/2018-06-01/runtime/init/error",
            &[("Lambda-Runtime-Function-Error-Type", "Runtime.InitError")],
            br#"{"errorType":"ConfigError","errorMessage":"bad config"}"#,
            false,
        );
        assert_eq!(status, 202);
        assert_eq!(
            rt.init_error(),
            Some(json!({"errorType": "ConfigError", "errorMessage": "bad config"}))
        );
        let err = rt
            .invoke(json!({}), Duration::from_secs(10))
            .expect_err("an error");
        assert_eq!(err.error_type, "ConfigError");
    }

    #[test]
    fn aws_lambda_event_of_a_vanished_poller_goes_to_the_next() {
        let rt = LambdaRuntime::start();
        let api = rt.api();
        let mut gone = Client::connect(&api);
        gone.out
            .write_all(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        wait_for("the first poll", Duration::from_secs(10), || {
            rt.first_poll().is_some()
        });
        drop(gone);
        // Give the stand-in a moment to notice the poller left.
        std::thread::sleep(Duration::from_millis(300));
        let function = std::thread::spawn(move || {
            let mut c = Client::connect(&api);
            let (id, _) = c.next();
            let (status, _, _) = c.request(
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/response"),
                &[],
                b"1",
                false,
            );
            assert_eq!(status, 202);
        });
        assert_eq!(rt.invoke(json!({}), Duration::from_secs(10)), Ok(json!(1)));
        function.join().expect("the function thread");
    }

    #[test]
    fn aws_lambda_stops_with_a_poll_waiting() {
        let rt = LambdaRuntime::start();
        let api = rt.api();
        let poller = std::thread::spawn(move || {
            let mut c = Client::connect(&api);
            c.out
                .write_all(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("send");
            // The connection ends without a response.
            read_head(&mut c.reader).is_none()
        });
        wait_for("the first poll", Duration::from_secs(10), || {
            rt.first_poll().is_some()
        });
        let started = Instant::now();
        drop(rt);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(poller.join().expect("the poller"));
    }

    #[test]
    fn aws_moto_answers_secrets_manager() {
        let dir = TempDir::new("moto");
        let moto = Moto::start(dir.path());
        let names = |moto: &Moto| {
            let list = moto
                .secrets_manager("ListSecrets", &json!({}))
                .expect("ListSecrets");
            list["SecretList"]
                .as_array()
                .expect("SecretList")
                .iter()
                .map(|s| s["Name"].as_str().expect("Name").to_string())
                .collect::<Vec<_>>()
        };
        assert!(names(&moto).is_empty());
        let created = moto
            .secrets_manager(
                "CreateSecret",
                &json!({"Name": "app", "SecretString": "not-a-real-secret"}),
            )
            .expect("CreateSecret");
        assert!(
            created["ARN"]
                .as_str()
                .is_some_and(|a| a.starts_with("arn:aws:secretsmanager:eu-west-1:"))
        );
        assert_eq!(names(&moto), ["app"]);
        let missing = moto
            .secrets_manager("GetSecretValue", &json!({"SecretId": "nope"}))
            .expect_err("no such secret");
        assert_eq!(missing["__type"], "ResourceNotFoundException");
        moto.reset();
        assert!(names(&moto).is_empty());
        assert!(
            moto.env()
                .contains(&("AWS_ENDPOINT_URL".to_string(), moto.endpoint()))
        );
    }
}
