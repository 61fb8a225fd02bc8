//! The outgoing HTTP client: forwards to the owner's service and calls to the WeChat
//! API, over HTTP or HTTPS (rustls with the operating system's root certificates), each
//! call bounded by a timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The largest answer read from a service or the WeChat API; a larger one is an error,
/// read no further (a reply is a few KB; WeChat's API answers are smaller still).
pub const MAX_ANSWER: usize = 1 << 20;

/// A pooled HTTP/1.1 client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Client {
    pub fn new() -> Client {
        // One crypto provider for the whole process; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        // Certificates the system cannot parse are skipped; an empty store still
        // serves plain HTTP and fails HTTPS calls with a clear error.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let tls =
            rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Client { inner: HyperClient::builder(TokioExecutor::new()).build(https) }
    }

    /// Sends one request and reads the whole answer, within `timeout`.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| format!("bad request to {url}: {e}"))?;
        let call = async {
            let resp = self.inner.request(req).await.map_err(|e| describe(&e))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

/// An error with its causes, e.g. `client error (Connect): tcp connect error: Connection refused`.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
