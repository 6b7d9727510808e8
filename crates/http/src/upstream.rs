//! The upstream leg: a fresh TCP connection and TLS session per pooled connection, verified
//! against the resource's CA and server name (verify-full unless the resource opts out), then
//! HTTP/1.1. Connections are pooled per resource; every request carries the injected
//! credential, never the client's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tollgate_config::Resource;

pub type UpstreamBody = BoxBody<Bytes, io::Error>;
pub type UpstreamClient = Client<Connector, UpstreamBody>;

/// Connects to one resource's upstream, whatever the request URI says.
#[derive(Clone)]
pub struct Connector {
    addr: String,
    server_name: ServerName<'static>,
    tls: Option<Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(resource: &Resource) -> Result<Connector, String> {
        let http = resource.http.as_ref().ok_or("not an http resource")?;
        // A stdio MCP server is reached through its process, never this connector. An
        // `http://` upstream is `tls.mode = "disable"` (the config checks they agree).
        let tls = if resource.stdio.is_some() {
            None
        } else {
            let tls = tollgate_tls::resource_client_config(
                &resource.name,
                &resource.tls,
                vec![b"http/1.1".to_vec()],
            )
            .map_err(|e| e.to_string())?;
            if http.tls && tls.is_none() {
                return Err("https upstream with tls disabled".into());
            }
            tls
        };
        let server_name = ServerName::try_from(resource.tls.server_name.clone()).map_err(|_| {
            format!(
                "{:?} is not a valid TLS server name",
                resource.tls.server_name
            )
        })?;
        Ok(Connector {
            addr: resource.upstream.clone(),
            server_name,
            tls,
            connect_timeout: resource.connect_timeout,
        })
    }

    pub fn client(self) -> UpstreamClient {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .build(self)
    }
}

/// One upstream connection, plaintext only when the resource explicitly allows it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, b),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, io::Error>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(this.connect_timeout, TcpStream::connect(&this.addr))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out")
                })??;
            let _ = tcp.set_nodelay(true);
            let stream = match this.tls {
                None => Stream::Plain(tcp),
                Some(cfg) => {
                    let tls = tokio::time::timeout(
                        this.connect_timeout,
                        tokio_rustls::TlsConnector::from(cfg).connect(this.server_name, tcp),
                    )
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "upstream TLS handshake timed out")
                    })??;
                    Stream::Tls(Box::new(tls))
                }
            };
            Ok(TokioIo::new(stream))
        })
    }
}
