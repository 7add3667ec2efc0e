//! `bitlora serve`: a small static file server for the page, so the demo needs nothing but the CLI.
//!
//! What it serves: `index.html` at `/` and everything under `web/` (the page's modules, the
//! worker, the built wasm in `web/pkg/` and the bundled model in `web/models/`). Nothing else in
//! the repository is reachable: not `.git`, not `target/`, not `Cargo.toml`.
//!
//! Why the headers matter:
//! - `.wasm` must be `application/wasm` or `WebAssembly.instantiateStreaming` refuses it, and
//!   module scripts/workers must be a JavaScript MIME type or the browser will not run them.
//! - `Cross-Origin-Opener-Policy: same-origin` + `Cross-Origin-Embedder-Policy: require-corp`
//!   make the page cross-origin isolated, which wasm threads (SharedArrayBuffer) will need later.
//! - The Content-Security-Policy allows only this origin (scripts, workers, fetches) plus
//!   `'wasm-unsafe-eval'`, which compiling WebAssembly needs; no inline script, no CDN. The page
//!   processes visitors' private files, so it must not be able to send them anywhere. The one
//!   exception is `connect-src`: the page downloads models from a Hugging Face-style hub
//!   (web/hub.js), so it may also connect to the hubs given with `--hub URL` (default
//!   https://huggingface.co plus the hosts its downloads redirect to, `https://*.huggingface.co`
//!   and `https://*.hf.co`; `--hub none` allows nothing off-origin). A hub the visitor types into
//!   the page that is not on this list is refused by the browser, and the page says which flag
//!   allows it. Only GETs of model files go there: the visitor's data never leaves the tab.
//!
//! Offline use (web/sw.js, a service worker; ARCHITECTURE.md, "Offline after the first visit"):
//! the worker's script lives at `/web/sw.js` but must control the page at `/`, so that response
//! alone carries `Service-Worker-Allowed: /` (without it the browser limits the worker to
//! `/web/`). Every file carries an `ETag` (its size and modification time) and a conditional GET
//! whose `If-None-Match` still matches gets `304 Not Modified` without the body: with
//! `Cache-Control: no-cache` the browser revalidates each file on every load, and the service
//! worker does the same for each file it keeps, so an unchanged 5 MB wasm costs one small round
//! trip, and a changed file (a rebuild, an edit) is fetched at once.
//!
//! Every connection is served on its own thread (a small HTTP/1.1 loop: GET and HEAD, keep-alive,
//! always a Content-Length), so one slow client never holds up the others, and every one is
//! bounded ([`Limits`]): at most 256 at once (the next is answered 503 at once), 60 s to wait
//! for a request, 20 s for a request head from its first byte, 30 s for any one write; an
//! accept() error backs off and retries instead of ending the server.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Headers sent with every response, the page's and the assets' alike (a module worker takes
/// its CSP and COEP from its own response, not from the page's). The CSP is built per server
/// ([`content_security_policy`]) because its connect-src names the allowed hubs.
const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Embedder-Policy", "require-corp"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    // A development server: always revalidate (cheap: ETag + 304), so a rebuilt web/pkg is
    // picked up on reload.
    ("Cache-Control", "no-cache"),
];

/// The service worker's script (web/sw.js) and the scope it may claim: the whole site, `/`, so
/// that it controls index.html too. Sent with that one response only.
const SERVICE_WORKER: (&str, &str) = ("web/sw.js", "/");

/// The hub the page downloads models from unless `--hub` says otherwise.
pub const DEFAULT_HUB: &str = "https://huggingface.co";

/// The page's Content-Security-Policy; `connect` are the extra connect-src sources (hubs).
pub fn content_security_policy(connect: &[String]) -> String {
    let mut connect_src = String::from("'self'");
    for c in connect {
        connect_src.push(' ');
        connect_src.push_str(c);
    }
    format!(
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; \
         connect-src {connect_src}; style-src 'self'; img-src 'self' data:; object-src 'none'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// The connect-src sources for `--hub` values: each hub's origin (scheme://host[:port]; a path
/// is dropped: CSP paths do not survive the hub's redirects), plus, for huggingface.co, the hosts
/// its LFS/Xet downloads redirect to. No values: the default hub; "none": nothing.
pub fn hub_sources(hubs: &[String]) -> Result<Vec<String>, ServeError> {
    let hubs: Vec<&str> = if hubs.is_empty() {
        vec![DEFAULT_HUB]
    } else {
        hubs.iter().map(String::as_str).collect()
    };
    let mut out: Vec<String> = Vec::new();
    for hub in hubs {
        if hub == "none" {
            continue;
        }
        let bad = |msg: &str| ServeError::Hub {
            hub: hub.to_string(),
            msg: msg.to_string(),
        };
        let (scheme, rest) = hub
            .split_once("://")
            .ok_or_else(|| bad("give a URL such as https://huggingface.co"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "https" && scheme != "http" {
            return Err(bad("the URL must start with https:// or http://"));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        // host[:port]; an IPv6 literal keeps its brackets: [::1]:9000.
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing ']'"))?;
            if !tail.is_empty() && !tail.starts_with(':') {
                return Err(bad("unexpected text after the IPv6 address"));
            }
            (format!("[{h}]"), tail.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
        if !host_ok || authority.contains('@') {
            return Err(bad("the host may hold only letters, digits, '.' and '-'"));
        }
        if let Some(p) = port
            && (p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) || p.parse::<u16>().is_err())
        {
            return Err(bad("the port must be a number up to 65535"));
        }
        let host = host.to_ascii_lowercase();
        let origin = match port {
            Some(p) => format!("{scheme}://{host}:{p}"),
            None => format!("{scheme}://{host}"),
        };
        let mut add = |s: String| {
            if !out.contains(&s) {
                out.push(s);
            }
        };
        add(origin);
        if host == "huggingface.co" || host == "hf.co" {
            add(format!("{scheme}://*.huggingface.co"));
            add(format!("{scheme}://*.hf.co"));
        }
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--hub {hub}: {msg}")]
    Hub { hub: String, msg: String },
    #[error(
        "{root}: index.html not found there; run `bitlora serve` from the repository root (or pass its path)"
    )]
    NoIndex { root: String },
    #[error("{root}: cannot resolve the directory: {source}")]
    Root {
        root: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {msg} (is the port in use? `--port 0` picks a free one)")]
    Bind { addr: String, msg: String },
    #[error("cannot print the server address: {0}")]
    Stdout(#[source] io::Error),
}

/// A bound, not yet running server; [`serve`] is bind + announce + run.
pub struct StaticServer {
    root: PathBuf,
    listener: TcpListener,
    addr: SocketAddr,
    /// The Content-Security-Policy header value (connect-src names the allowed hubs).
    csp: String,
    limits: Limits,
}

/// What one client may hold of the server: a connection slot, and time.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; the next one gets a 503 and is closed. Well under the usual
    /// 1,024 open files, so accept() never fails for want of them.
    pub max_connections: usize,
    /// How long a connection may wait for the first byte of a request (keep-alive idling).
    pub idle: Duration,
    /// How long a request head may take from its first byte to its blank line (a client that
    /// sends it a byte at a time cannot hold its slot longer).
    pub head: Duration,
    /// How long one write may block on a client that does not read.
    pub write: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            idle: IDLE_TIMEOUT,
            head: Duration::from_secs(20),
            write: Duration::from_secs(30),
        }
    }
}

impl StaticServer {
    /// Binds 127.0.0.1:`port` (0 picks a free port). Only loopback: the page is a local demo.
    pub fn bind(root: &Path, port: u16) -> Result<StaticServer, ServeError> {
        let root = root.canonicalize().map_err(|source| ServeError::Root {
            root: root.display().to_string(),
            source,
        })?;
        if !root.join("index.html").is_file() {
            return Err(ServeError::NoIndex {
                root: root.display().to_string(),
            });
        }
        let want = format!("127.0.0.1:{port}");
        let bind_err = |e: io::Error| ServeError::Bind {
            addr: want.clone(),
            msg: e.to_string(),
        };
        let listener = TcpListener::bind(&want).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let csp = content_security_policy(&hub_sources(&[])?);
        Ok(StaticServer {
            root,
            listener,
            addr,
            csp,
            limits: Limits::default(),
        })
    }

    /// Other limits than [`Limits::default`] (tests use small ones).
    #[cfg(test)]
    pub fn with_limits(mut self, limits: Limits) -> StaticServer {
        self.limits = limits;
        self
    }

    /// Lets the page connect to these hubs (`--hub` values, see [`hub_sources`]) instead of the
    /// default one.
    pub fn allow_hubs(mut self, hubs: &[String]) -> Result<StaticServer, ServeError> {
        self.csp = content_security_policy(&hub_sources(hubs)?);
        Ok(self)
    }

    /// The hubs the page may connect to, as connect-src lists them (after 'self').
    pub fn connect_src(&self) -> &str {
        let start = self
            .csp
            .find("connect-src 'self'")
            .map_or(0, |i| i + "connect-src 'self'".len());
        let end = self.csp[start..]
            .find(';')
            .map_or(self.csp.len(), |i| start + i);
        self.csp[start..end].trim()
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Answers requests until the process ends.
    ///
    /// One thread per connection, for as long as the browser keeps it open (keep-alive), up to
    /// [`Limits::max_connections`] at once. Not a queueing pool: tiny_http's pool (used here
    /// before) could queue a new connection behind threads held by idle keep-alive connections
    /// when several opened at once (a page importing many modules), and the browser's requests
    /// on it then waited forever; past the cap a connection is answered 503 at once instead.
    /// Every connection is bounded in time ([`Limits`]), so slow or idle clients give their
    /// slots back. An accept() error (out of file descriptors, say) backs off and retries; a
    /// thread that cannot be started costs that one connection.
    pub fn run(self) -> Result<(), ServeError> {
        self.run_with(|name, work| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(work)
                .map(drop)
        })
    }

    /// [`StaticServer::run`] with `spawn` starting each connection's thread (tests pass one
    /// that fails, as the OS does when it is out of threads).
    fn run_with(
        self,
        spawn: impl Fn(&str, Box<dyn FnOnce() + Send>) -> io::Result<()>,
    ) -> Result<(), ServeError> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let root = Arc::new(self.root);
        let csp: Arc<str> = self.csp.into();
        let limits = self.limits;
        let live = Arc::new(AtomicUsize::new(0));
        let mut backoff = Duration::from_millis(10);
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // A client that gave up between connecting and being accepted is routine.
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                    ) {
                        eprintln!(
                            "bitlora serve: cannot accept a connection ({e}); retrying in {} ms",
                            backoff.as_millis()
                        );
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            if live.load(Ordering::SeqCst) >= limits.max_connections {
                refuse(stream, &csp);
                continue;
            }
            // The slot is given back when the connection's thread ends (or never starts).
            struct Slot(Arc<AtomicUsize>);
            impl Drop for Slot {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            live.fetch_add(1, Ordering::SeqCst);
            let slot = Slot(live.clone());
            let (root, csp) = (root.clone(), csp.clone());
            let spawned = spawn(
                "bitlora-serve",
                Box::new(move || {
                    let _slot = slot;
                    serve_connection(&root, &csp, stream, limits);
                }),
            );
            if let Err(e) = spawned {
                eprintln!(
                    "bitlora serve: cannot start a thread for a connection ({e}); it is closed"
                );
            }
        }
        Ok(())
    }
}

/// Answers a connection past the cap with 503 (Retry-After: 1) and closes it, without waiting
/// on the client.
fn refuse(stream: TcpStream, csp: &str) {
    // Never wait here (the accept loop runs this): take what the client has sent so far (its
    // request, usually), since closing a socket with unread input resets it and the client
    // would lose the answer; the answer fits the socket's send buffer.
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).read(&mut [0u8; 4096]);
    let mut out = BufWriter::new(&stream);
    let _ = write_response(
        &mut out,
        csp,
        503,
        "text/plain; charset=utf-8",
        &[("Retry-After", "1")],
        Body::Text("too many connections; try again\n"),
        false,
    );
    let _ = out.flush();
    drop(out);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Serves `root` (the repository root: index.html and web/) on 127.0.0.1:`port` until killed.
/// After binding it prints exactly one line to stdout, `bitlora: serving <root> at <url>`, and
/// flushes it: tests start `bitlora serve --port 0` and read the URL from that line.
/// `hubs`: the `--hub` values (see [`hub_sources`]).
pub fn serve(root: &Path, port: u16, hubs: &[String]) -> Result<(), ServeError> {
    let server = StaticServer::bind(root, port)?.allow_hubs(hubs)?;
    let hubs = server.connect_src();
    eprintln!(
        "bitlora: the page may download models from {}",
        if hubs.is_empty() {
            "no other origin (--hub none)"
        } else {
            hubs
        }
    );
    if !server.root().join("web/pkg/bitlora_web.js").is_file() {
        eprintln!(
            "bitlora: warning: web/pkg/bitlora_web.js is missing; run tools/build-web.sh so the page can load its wasm"
        );
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "bitlora: serving {} at {}",
        server.root().display(),
        server.url()
    )
    .and_then(|()| out.flush())
    .map_err(ServeError::Stdout)?;
    drop(out);
    server.run()
}

/// How long an idle keep-alive connection (or a half-sent request) is kept before closing it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request head (request line + headers) accepted.
const MAX_HEAD: usize = 32 * 1024;

/// A parsed request head: all the server looks at.
struct RequestHead {
    method: String,
    target: String,
    /// Whether the client wants the connection kept open for another request.
    keep_alive: bool,
    /// The `If-None-Match` header's value, if any (a conditional GET).
    if_none_match: Option<String>,
}

/// The read side of a connection under [`Limits`]: each read waits at most `idle` for a
/// request's first byte, then the rest of the head must come within `head` of it.
struct Timed {
    stream: TcpStream,
    idle: Duration,
    head: Duration,
    /// When the current request's head must be complete (set by its first byte).
    until: Option<std::time::Instant>,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wait = match self.until {
            None => self.idle,
            Some(t) => t.saturating_duration_since(std::time::Instant::now()),
        };
        if wait.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(wait))?;
        let n = self.stream.read(buf)?;
        if n > 0 && self.until.is_none() {
            self.until = Some(std::time::Instant::now() + self.head);
        }
        Ok(n)
    }
}

/// Answers requests on one connection until the client closes it, asks to close it, idles past
/// `limits.idle`, takes longer than `limits.head` to send a request head, does not read what it
/// is sent within `limits.write`, or sends something that is not HTTP/1.x.
fn serve_connection(root: &Path, csp: &str, stream: TcpStream, limits: Limits) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let _ = write_half.set_write_timeout(Some(limits.write));
    let mut reader = BufReader::new(Timed {
        stream,
        idle: limits.idle,
        head: limits.head,
        until: None,
    });
    let mut out = BufWriter::new(write_half);
    loop {
        let head = read_head(&mut reader);
        // The next request's head has its own deadline, from its own first byte.
        reader.get_mut().until = None;
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => return, // closed (or timed out) between requests
            Err(()) => {
                let _ = write_response(
                    &mut out,
                    csp,
                    400,
                    "text/plain; charset=utf-8",
                    &[],
                    Body::Text("bad request\n"),
                    false,
                );
                let _ = out.flush();
                return;
            }
        };
        let ok = respond(root, csp, &head, &mut out)
            .and_then(|()| out.flush())
            .is_ok();
        // A client that hung up is not our error; there is no one left to tell.
        if !ok || !head.keep_alive {
            return;
        }
    }
}

/// Reads one request head. Ok(None): the connection ended cleanly before a request started.
/// Err: not HTTP/1.x, too large, or cut off mid-head (the caller answers 400 where it can).
fn read_head(reader: &mut impl BufRead) -> Result<Option<RequestHead>, ()> {
    let mut lines: Vec<String> = Vec::new();
    let mut size = 0;
    loop {
        let mut line = Vec::new();
        let n = match reader
            .by_ref()
            .take((MAX_HEAD - size + 1) as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(n) => n,
            // Idle past the timeout, or reset, between two requests: just close.
            Err(_) if size == 0 => return Ok(None),
            Err(_) => return Err(()),
        };
        if n == 0 {
            return if size == 0 { Ok(None) } else { Err(()) };
        }
        size += n;
        if size > MAX_HEAD || !line.ends_with(b"\n") {
            return Err(());
        }
        let line = String::from_utf8(line).map_err(|_| ())?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if lines.is_empty() {
                continue; // tolerate blank lines between requests (RFC 9112 2.2)
            }
            break;
        }
        lines.push(line.to_string());
    }
    let mut parts = lines[0].split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(());
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(()),
    };
    let mut connection = String::new();
    let mut has_body = false;
    let mut if_none_match: Option<String> = None;
    for h in &lines[1..] {
        let (name, value) = h.split_once(':').ok_or(())?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "connection" => connection = value.to_ascii_lowercase(),
            "content-length" => has_body |= value != "0",
            "transfer-encoding" => has_body = true,
            "if-none-match" => if_none_match = Some(value.to_string()),
            _ => {}
        }
    }
    // A request body is never read (only GET and HEAD are served), so the connection ends after
    // answering one: its body would otherwise be taken for the next request.
    let keep_alive = !has_body
        && if http11 {
            !connection.contains("close")
        } else {
            connection.contains("keep-alive")
        };
    Ok(Some(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        keep_alive,
        if_none_match,
    }))
}

enum Body<'a> {
    Text(&'a str),
    File(File, u64),
}

fn respond(root: &Path, csp: &str, head: &RequestHead, out: &mut impl Write) -> io::Result<()> {
    let keep = head.keep_alive;
    let get = head.method == "GET";
    if !get && head.method != "HEAD" {
        return write_response(
            out,
            csp,
            405,
            "text/plain; charset=utf-8",
            &[("Allow", "GET, HEAD")],
            Body::Text("method not allowed: only GET and HEAD\n"),
            keep,
        );
    }
    let (status, text) = match resolve(root, &head.target) {
        Ok(path) => match File::open(&path).and_then(|f| Ok((f.metadata()?, f))) {
            // Always a Content-Length (never chunked): the page's progress bars and, later,
            // HTTP Range requests need to know the size up front.
            Ok((meta, file)) => {
                let len = meta.len();
                let etag = etag(&meta);
                let sw_allowed = path == root.join(SERVICE_WORKER.0);
                let mut extra: Vec<(&str, &str)> = Vec::new();
                if let Some(tag) = &etag {
                    extra.push(("ETag", tag.as_str()));
                }
                if sw_allowed {
                    extra.push(("Service-Worker-Allowed", SERVICE_WORKER.1));
                }
                // Unchanged since the client's copy: the headers (with the 200's
                // Content-Length, as RFC 9110 15.4.5 allows) and no body.
                let fresh = matches!((&etag, &head.if_none_match), (Some(t), Some(inm)) if etag_matches(inm, t));
                let (status, body) = if fresh {
                    (304, Body::Text(""))
                } else if get {
                    (200, Body::File(file, len))
                } else {
                    (200, Body::File(file, 0))
                };
                return write_head_and(out, csp, status, mime_type(&path), &extra, len, body, keep);
            }
            Err(_) => (404, "not found\n"),
        },
        Err(Reject::NotFound) => (404, "not found\n"),
        Err(Reject::Forbidden) => (403, "forbidden\n"),
    };
    let body = if get {
        Body::Text(text)
    } else {
        Body::Text("")
    };
    write_head_and(
        out,
        csp,
        status,
        "text/plain; charset=utf-8",
        &[],
        text.len() as u64,
        body,
        keep,
    )
}

fn write_response(
    out: &mut impl Write,
    csp: &str,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: Body,
    keep: bool,
) -> io::Result<()> {
    let len = match &body {
        Body::Text(t) => t.len() as u64,
        Body::File(_, n) => *n,
    };
    write_head_and(out, csp, status, content_type, extra, len, body, keep)
}

/// Writes the status line and headers (`len` as Content-Length, also for HEAD), then `body`.
#[allow(clippy::too_many_arguments)]
fn write_head_and(
    out: &mut impl Write,
    csp: &str,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    len: u64,
    body: Body,
    keep: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n"
    )?;
    for (name, value) in SECURITY_HEADERS.iter().chain(extra) {
        write!(out, "{name}: {value}\r\n")?;
    }
    write!(
        out,
        "Content-Security-Policy: {csp}\r\nConnection: {}\r\n\r\n",
        if keep { "keep-alive" } else { "close" }
    )?;
    match body {
        Body::Text(t) => out.write_all(t.as_bytes()),
        Body::File(file, n) => {
            let copied = io::copy(&mut file.take(n), out)?;
            if copied == n {
                Ok(())
            } else {
                // The file shrank while being sent: the Content-Length is now a lie, so the
                // connection must end here.
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shorter than its Content-Length",
                ))
            }
        }
    }
}

/// A file's entity tag: its size and modification time (ns since the epoch), in hex, strong
/// (`"<len>-<mtime>"`, as nginx does). A rebuilt or edited file gets a new mtime and so a new tag;
/// None where the file system keeps no mtime (then every GET is a full 200).
fn etag(meta: &std::fs::Metadata) -> Option<String> {
    let mtime = meta.modified().ok()?;
    let ns = mtime.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    Some(format!("\"{:x}-{:x}\"", meta.len(), ns))
}

/// Whether an `If-None-Match` value names `tag`: `*`, or a comma-separated list of tags compared
/// weakly (a `W/` prefix ignored), as RFC 9110 13.1.2 says for If-None-Match.
fn etag_matches(if_none_match: &str, tag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    if_none_match.trim() == "*" || if_none_match.split(',').any(|t| bare(t) == bare(tag))
}

#[derive(Debug, PartialEq, Eq)]
enum Reject {
    /// No such file, a directory, or outside what we serve.
    NotFound,
    /// A path that tries to climb out (`..`), hides (`.git`) or smuggles separators.
    Forbidden,
}

/// Maps a request target (`/web/main.js?x=1`) to a file under `root`, or says why not.
/// Pure string checks first (so traversal is refused whatever the file system holds), then a
/// canonicalize + prefix check, which also refuses symlinks that lead out of the tree.
fn resolve(root: &Path, target: &str) -> Result<PathBuf, Reject> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let Some(path) = path.strip_prefix('/') else {
        return Err(Reject::Forbidden); // absolute-form or `*` targets
    };
    let decoded = percent_decode(path).ok_or(Reject::Forbidden)?;
    let rel = if decoded.is_empty() {
        "index.html".to_string()
    } else {
        decoded
    };

    let mut clean = PathBuf::new();
    for segment in rel.split('/') {
        if segment.is_empty() {
            continue; // tolerate `//`
        }
        if segment == "." || segment == ".." || segment.starts_with('.') {
            return Err(Reject::Forbidden);
        }
        if segment.contains(['\\', '\0', ':']) {
            return Err(Reject::Forbidden);
        }
        clean.push(segment);
    }
    // Only the page and its assets are public.
    let public = clean == Path::new("index.html") || clean.starts_with("web");
    if !public {
        return Err(Reject::NotFound);
    }
    let full = root
        .join(&clean)
        .canonicalize()
        .map_err(|_| Reject::NotFound)?;
    // After resolving symlinks the file must still be the page or under web/.
    let inside = full == root.join("index.html")
        || root
            .join("web")
            .canonicalize()
            .is_ok_and(|web| full.starts_with(web));
    if !inside {
        return Err(Reject::Forbidden);
    }
    if !full.is_file() {
        return Err(Reject::NotFound); // directories are not listed
    }
    Ok(full)
}

/// Decodes `%XX` escapes; None for malformed escapes or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The Content-Type for a file, by extension. Browsers enforce these for wasm and modules.
fn mime_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("json" | "map") => "application/json",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        Some("ts") => "text/plain; charset=utf-8", // wasm-bindgen's .d.ts, for reading only
        // .safetensors, .gguf and anything unknown: bytes, never sniffed (nosniff).
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;

    #[test]
    fn mime_types() {
        for (file, want) in [
            ("web/pkg/bitlora_web_bg.wasm", "application/wasm"),
            ("web/main.js", "text/javascript; charset=utf-8"),
            ("web/x.mjs", "text/javascript; charset=utf-8"),
            ("web/models/tiny/config.json", "application/json"),
            ("web/style.css", "text/css; charset=utf-8"),
            ("index.html", "text/html; charset=utf-8"),
            (
                "web/models/tiny/model.safetensors",
                "application/octet-stream",
            ),
            ("web/UPPER.WASM", "application/wasm"),
            ("web/no_extension", "application/octet-stream"),
        ] {
            assert_eq!(mime_type(Path::new(file)), want, "{file}");
        }
    }

    /// A throwaway tree: index.html, web/a.js, web/sub/b.wasm, secret.txt beside them, a .git.
    fn tree() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "bitlora-serve-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("web/sub")).unwrap();
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        std::fs::write(dir.join("index.html"), "<!doctype html>hi").unwrap();
        std::fs::write(dir.join("web/a.js"), "export {}").unwrap();
        std::fs::write(dir.join("web/sub/b.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::fs::write(dir.join("web/sw.js"), "// a service worker").unwrap();
        std::fs::write(dir.join("secret.txt"), "no").unwrap();
        std::fs::write(dir.join(".git/config"), "no").unwrap();
        dir.canonicalize().unwrap()
    }

    #[test]
    fn resolves_public_files() {
        let root = tree();
        assert_eq!(resolve(&root, "/"), Ok(root.join("index.html")));
        assert_eq!(resolve(&root, "/?backend=cpu"), Ok(root.join("index.html")));
        assert_eq!(resolve(&root, "/web/a.js"), Ok(root.join("web/a.js")));
        assert_eq!(
            resolve(&root, "/web//sub/b.wasm#x"),
            Ok(root.join("web/sub/b.wasm"))
        );
        assert_eq!(resolve(&root, "/web/%61.js"), Ok(root.join("web/a.js")));
    }

    #[test]
    fn rejects_traversal_and_private_files() {
        let root = tree();
        for target in [
            "/../etc/passwd",
            "/web/../secret.txt",
            "/web/%2e%2e/secret.txt",
            "/web/%2E%2E/%2E%2E/etc/passwd",
            "/web/..%2fsecret.txt",
            "/.git/config",
            "/web/.hidden",
            "/web/a.js%00.png",
            "/web\\..\\secret.txt",
            "/web/%zz",
            "http://evil/x",
            "*",
        ] {
            assert_eq!(resolve(&root, target), Err(Reject::Forbidden), "{target}");
        }
        for target in [
            "/secret.txt",
            "/Cargo.toml",
            "/web/missing.js",
            "/web",
            "/web/sub/",
        ] {
            assert_eq!(resolve(&root, target), Err(Reject::NotFound), "{target}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn rejects_symlink_out_of_tree() {
        let root = tree();
        std::os::unix::fs::symlink(root.join("secret.txt"), root.join("web/link.txt")).unwrap();
        assert_eq!(resolve(&root, "/web/link.txt"), Err(Reject::Forbidden));
    }

    /// A server on a fresh tree (see [`tree`]) with `limits`, running on its own thread.
    fn start(limits: Limits) -> SocketAddr {
        let server = StaticServer::bind(&tree(), 0).unwrap().with_limits(limits);
        let addr = server.addr;
        std::thread::spawn(move || server.run());
        addr
    }

    /// `get` until a 200 comes back (slots freed by other threads take a moment), for at
    /// most 10 s; the last response.
    fn get_until_served(addr: SocketAddr, raw: &str) -> String {
        let mut served = String::new();
        for _ in 0..200 {
            served = get(addr, raw);
            if served.starts_with("HTTP/1.1 200") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    fn get(addr: SocketAddr, raw: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_over_http_with_headers() {
        let root = tree();
        let server = StaticServer::bind(&root, 0).unwrap();
        let addr = server.addr;
        assert!(server.url().starts_with("http://127.0.0.1:"));
        std::thread::spawn(move || server.run());

        let wasm = get(
            addr,
            "GET /web/sub/b.wasm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(wasm.starts_with("HTTP/1.1 200"), "{wasm}");
        let lower = wasm.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/wasm"), "{wasm}");
        assert!(
            lower.contains("cross-origin-opener-policy: same-origin"),
            "{wasm}"
        );
        assert!(
            lower.contains("cross-origin-embedder-policy: require-corp"),
            "{wasm}"
        );
        assert!(lower.contains("x-content-type-options: nosniff"), "{wasm}");
        assert!(lower.contains("'wasm-unsafe-eval'"), "{wasm}");

        let missing = get(
            addr,
            "GET /web/nope.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let climb = get(
            addr,
            "GET /web/../secret.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(climb.starts_with("HTTP/1.1 403"), "{climb}");
        let post = get(
            addr,
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }

    /// Connections past the cap are answered 503 at once (not queued, not a crash), and the
    /// slots come back when their clients go.
    #[test]
    fn connections_past_the_cap_get_503_and_slots_come_back() {
        let limits = Limits {
            max_connections: 3,
            ..Limits::default()
        };
        let addr = start(limits);
        // Accepted in order, so these three hold the three slots before the fourth arrives.
        let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let req = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let refused = get(addr, req);
        assert!(
            refused.starts_with("HTTP/1.1 503 Service Unavailable"),
            "{refused}"
        );
        assert!(
            refused.to_ascii_lowercase().contains("retry-after: 1"),
            "{refused}"
        );
        assert!(refused.contains("too many connections"), "{refused}");
        drop(held);
        // Their threads see the close and give the slots back; a new client is served.
        let served = get_until_served(addr, req);
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    }

    /// A client that sends its request head a byte at a time (slowloris) loses the connection
    /// once the head has taken longer than `Limits::head`, however often bytes arrive; the same
    /// client is served within a longer deadline.
    #[test]
    fn a_request_head_has_a_deadline() {
        let slow = |head: Duration| {
            let limits = Limits {
                head,
                ..Limits::default()
            };
            let addr = start(limits);
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // A byte every 20 ms (about 1 s in all): each read is far within any idle timeout.
            for b in b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" {
                if s.write_all(&[*b]).is_err() {
                    break; // the server has closed it
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        let cut = slow(Duration::from_millis(300));
        assert!(!cut.starts_with("HTTP/1.1 200"), "{cut}");
        let served = slow(Duration::from_secs(30));
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    }

    /// A thread that cannot be started (the OS out of threads) costs that one connection: it is
    /// closed, its slot comes back, and the server goes on (it panicked before).
    #[test]
    fn a_thread_that_cannot_start_costs_one_connection() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let server = StaticServer::bind(&tree(), 0).unwrap().with_limits(Limits {
            max_connections: 1,
            ..Limits::default()
        });
        let addr = server.addr;
        let calls = AtomicUsize::new(0);
        std::thread::spawn(move || {
            server.run_with(|name, work| {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "out of threads"));
                }
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(work)
                    .map(drop)
            })
        });
        let req = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        // The first connection is closed (or reset: its request was never read) without a
        // response; the slot is free for the next.
        let mut first = TcpStream::connect(addr).unwrap();
        first.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        match first.read_to_string(&mut out) {
            Ok(_) => assert_eq!(out, "", "the first connection got a response"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        let served = get_until_served(addr, req);
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    }

    /// A client that asks for a large file and never reads the response cannot hold its slot:
    /// the blocked write gives up after `Limits::write` and the connection closes, so with a
    /// single slot the next client is served.
    #[test]
    fn a_client_that_does_not_read_loses_its_slot() {
        let limits = Limits {
            max_connections: 1,
            write: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = StaticServer::bind(&tree(), 0).unwrap().with_limits(limits);
        // Larger than loopback's socket buffers on both sides, so the server's write blocks.
        std::fs::write(server.root().join("web/big.bin"), vec![7u8; 64 << 20]).unwrap();
        let addr = server.addr;
        std::thread::spawn(move || server.run());
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled
            .write_all(b"GET /web/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // Never read from `stalled`. Past the write limit its slot comes back.
        let req = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let served = get_until_served(addr, req);
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        drop(stalled);
    }

    #[test]
    fn slow_client_does_not_block_others() {
        let addr = start(Limits::default());
        // Half a request that never finishes...
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled
            .write_all(b"GET /index.html HTTP/1.1\r\nHo")
            .unwrap();
        // ...while another client is served at once.
        let ok = get(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.ends_with("<!doctype html>hi"), "{ok}");
        drop(stalled);
    }

    /// Reads one response with a Content-Length from a keep-alive connection.
    fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("Content-Length");
        let mut body = vec![0; len];
        s.read_exact(&mut body).unwrap();
        (head, body)
    }

    /// A page importing many modules opens several keep-alive connections at once and sends
    /// more requests on each; every one must be answered (tiny_http's thread pool left some
    /// connections unread behind idle keep-alive ones, and the page hung).
    #[test]
    fn many_keep_alive_connections_at_once_are_all_served() {
        let addr = start(Limits::default());
        let mut conns: Vec<TcpStream> =
            (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for round in 0..3 {
            for s in &mut conns {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            }
            for (i, s) in conns.iter_mut().enumerate() {
                let (head, body) = read_response(s);
                assert!(
                    head.starts_with("HTTP/1.1 200"),
                    "connection {i}, round {round}: {head}"
                );
                assert!(
                    head.to_ascii_lowercase().contains("connection: keep-alive"),
                    "{head}"
                );
                assert_eq!(body, b"<!doctype html>hi", "connection {i}, round {round}");
            }
        }
        // HEAD: the headers (with the GET's Content-Length) and no body; then a close.
        let head = get(
            addr,
            "HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.contains("Content-Length: 17\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        // Not HTTP: a 400 and the connection ends.
        assert!(get(addr, "hello\r\n\r\n").starts_with("HTTP/1.1 400"));
    }

    /// The header's value in a raw response, if present (names compared case-insensitively).
    fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
        let head = resp.split("\r\n\r\n").next().unwrap_or("");
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// web/sw.js, and only it, may control the whole site (the page at `/`).
    #[test]
    fn service_worker_may_control_the_site() {
        let addr = start(Limits::default());
        let sw = get(
            addr,
            "GET /web/sw.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(sw.starts_with("HTTP/1.1 200"), "{sw}");
        assert_eq!(header(&sw, "service-worker-allowed"), Some("/"), "{sw}");
        assert_eq!(
            header(&sw, "content-type"),
            Some("text/javascript; charset=utf-8")
        );
        assert!(sw.ends_with("// a service worker"), "{sw}");
        for other in ["/", "/web/a.js", "/web/sub/b.wasm", "/web/nope/sw.js"] {
            let resp = get(
                addr,
                &format!("GET {other} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            );
            assert_eq!(
                header(&resp, "service-worker-allowed"),
                None,
                "{other}: {resp}"
            );
        }
    }

    /// Every file has an ETag; a GET with a matching If-None-Match is a 304 without a body (on a
    /// kept-alive connection, so the framing must hold), a stale one a full 200, and editing the
    /// file changes the tag.
    #[test]
    fn etag_and_not_modified() {
        let root = tree();
        let server = StaticServer::bind(&root, 0).unwrap();
        let addr = server.addr;
        std::thread::spawn(move || server.run());
        let first = get(
            addr,
            "GET /web/a.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let tag = header(&first, "etag").expect("an ETag").to_string();
        assert!(
            tag.starts_with('"') && tag.ends_with('"') && tag.len() > 4,
            "{tag}"
        );
        assert!(first.ends_with("export {}"), "{first}");

        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for inm in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"zz\", {tag}"),
            "*".to_string(),
        ] {
            s.write_all(
                format!("GET /web/a.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: {inm}\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            // read_response reads exactly Content-Length bytes; a 304 sends none, so read the head.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            assert!(
                head.starts_with("HTTP/1.1 304 Not Modified"),
                "{inm}: {head}"
            );
            assert_eq!(header(&head, "etag"), Some(tag.as_str()), "{head}");
            // The security headers come with a 304 too (it updates the stored response's).
            assert_eq!(
                header(&head, "cross-origin-embedder-policy"),
                Some("require-corp")
            );
        }
        // The same connection still frames the next request right: a stale tag gives the body.
        s.write_all(b"GET /web/a.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"stale\"\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"export {}");

        // An edit (another size and mtime) is a new tag, so the old one no longer matches.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(root.join("web/a.js"), "export const changed = 1;").unwrap();
        let after = get(
            addr,
            &format!(
                "GET /web/a.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: {tag}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert!(after.starts_with("HTTP/1.1 200"), "{after}");
        assert_ne!(header(&after, "etag"), Some(tag.as_str()));
        assert!(after.ends_with("export const changed = 1;"), "{after}");
        // Errors carry no tag.
        let missing = get(
            addr,
            "GET /web/nope.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(header(&missing, "etag"), None);
    }

    #[test]
    fn etag_comparison() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches(" W/\"a\" ", "\"a\""));
        assert!(etag_matches("\"b\", \"a\"", "\"a\""));
        assert!(etag_matches("*", "\"a\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
        assert!(!etag_matches("", "\"a\""));
    }

    #[test]
    fn hub_sources_from_flags() {
        let s = |v: &[&str]| hub_sources(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(
            s(&[]).unwrap(),
            [
                "https://huggingface.co",
                "https://*.huggingface.co",
                "https://*.hf.co"
            ]
        );
        assert_eq!(s(&["none"]).unwrap(), Vec::<String>::new());
        assert_eq!(
            s(&["http://127.0.0.1:8123/", "https://Mirror.example/hf/path"]).unwrap(),
            ["http://127.0.0.1:8123", "https://mirror.example"]
        );
        assert_eq!(s(&["http://[::1]:9000"]).unwrap(), ["http://[::1]:9000"]);
        for bad in [
            "huggingface.co",
            "ftp://x",
            "https://a b",
            "https://x;script-src *",
            "https://u@x",
            "https://x:99999",
            "https://'self'",
        ] {
            assert!(s(&[bad]).is_err(), "{bad} was accepted");
        }
        let csp = content_security_policy(&s(&["http://127.0.0.1:8123"]).unwrap());
        assert!(
            csp.contains("connect-src 'self' http://127.0.0.1:8123;"),
            "{csp}"
        );
    }

    #[test]
    fn csp_names_the_allowed_hubs() {
        let root = tree();
        let server = StaticServer::bind(&root, 0)
            .unwrap()
            .allow_hubs(&["http://127.0.0.1:9".to_string()])
            .unwrap();
        assert_eq!(server.connect_src(), "http://127.0.0.1:9");
        let addr = server.addr;
        std::thread::spawn(move || server.run());
        let page = get(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            page.contains("connect-src 'self' http://127.0.0.1:9; style-src"),
            "{page}"
        );
    }

    #[test]
    fn bind_refuses_a_root_without_index() {
        let dir = tree().join("web");
        match StaticServer::bind(&dir, 0) {
            Err(ServeError::NoIndex { .. }) => {}
            other => panic!("expected NoIndex, got {:?}", other.err()),
        }
    }
}
