//! TLS termination with a certificate generated in the test: ALPN h2 and http/1.1, the `Secure`
//! pin, and `X-Forwarded-Proto: https`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{config, eventually, throughout, Proxy, Upstream};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use stickylb::config::Config;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct TestCert {
    der: CertificateDer<'static>,
    cert: PathBuf,
    key: PathBuf,
}

fn test_cert() -> TestCert {
    let generated = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("stickylb-tls-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.key_pair.serialize_pem()).unwrap();
    TestCert {
        der: generated.cert.der().clone(),
        cert,
        key,
    }
}

fn tls_config(upstreams: &[&Upstream], cert: &TestCert) -> String {
    let tls = format!(
        "[listener.tls]\ncert = {:?}\nkey = {:?}\n[health]\ninterval = \"1h\"\n",
        cert.cert.display().to_string(),
        cert.key.display().to_string()
    );
    config(upstreams, &tls)
}

/// A TLS client that trusts only `cert` and offers exactly `alpn`.
async fn connect(
    addr: std::net::SocketAddr,
    cert: &TestCert,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("app.test").unwrap();
    let tls = TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "ALPN agreed");
    tls
}

/// GET `target` over `tls`; an HTTP/1 request in origin form (`/`) is served by the lane, one in
/// absolute form by hyper.
async fn get_over(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    h2: bool,
    target: &str,
) -> Response<Bytes> {
    let io = TokioIo::new(tls);
    let req = Request::get(target)
        .header("host", "app.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = if h2 {
        let req = Request::get("https://app.test/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn tls_terminates_with_alpn_h2_and_http1_and_the_pin_is_secure() {
    let cert = test_cert();
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&tls_config(&[&a], &cert)).await;
    let cases = [
        (&b"h2"[..], true, "https://app.test/"),
        (&b"http/1.1"[..], false, "https://app.test/"),
        (&b"http/1.1"[..], false, "/"),
    ];
    for (alpn, h2, target) in cases {
        let resp = get_over(connect(proxy.addr, &cert, alpn).await, h2, target).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body().as_ref(), b"a");
        let pin = resp.headers()["set-cookie"].to_str().unwrap();
        assert!(pin.contains("Secure"), "{pin}");
        let seen = a.seen().pop().unwrap();
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        assert_eq!(seen.headers["host"], "app.test");
    }
}

#[test]
fn a_bad_certificate_or_key_is_a_config_error_naming_the_key() {
    let cert = test_cert();
    let other = test_cert();
    let base = "[listener]\naddress = \"127.0.0.1:0\"\n[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n";
    let with = |c: &Path, k: &Path| {
        format!(
            "{base}[listener.tls]\ncert = {:?}\nkey = {:?}\n",
            c.display().to_string(),
            k.display().to_string()
        )
        .replacen(
            "[[backends]]",
            "[affinity]\nsecret = \"0123456789abcdef\"\n[[backends]]",
            1,
        )
    };
    let parse = |src: String| Config::parse(&src, Path::new("t.toml"), None);
    assert!(parse(with(&cert.cert, &cert.key)).is_ok());
    let cases = [
        (
            with(Path::new("/nonexistent/cert.pem"), &cert.key),
            "listener.tls.cert",
        ),
        (with(&cert.key, &cert.key), "listener.tls.cert"),
        (
            with(&cert.cert, Path::new("/nonexistent/key.pem")),
            "listener.tls.key",
        ),
        (with(&cert.cert, &other.key), "listener.tls.key"),
    ];
    for (src, key) in cases {
        let e = parse(src).unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert!(e.to_string().contains("t.toml"), "{e}");
    }
}

/// Parking works under TLS too: the TLS session outlives the parked hyper connection, and the
/// next request on it is served. HTTP/2 connections are never parked.
#[tokio::test]
async fn quiet_tls_http1_connections_are_parked_and_http2_ones_are_not() {
    let cert = test_cert();
    let a = Upstream::start("a").await;
    let park = "[timeouts]\nclient_park = \"50ms\"\n[health]";
    let proxy = Proxy::start(&tls_config(&[&a], &cert).replacen("[health]", park, 1)).await;
    let parked = || proxy.lb.parked_connections();
    let get = || {
        Request::get("https://app.test/")
            .header("host", "app.test")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let io = TokioIo::new(connect(proxy.addr, &cert, b"http/1.1").await);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    for round in 0..2 {
        send.ready().await.unwrap();
        let resp = send.send_request(get()).await.unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"a"
        );
        eventually(
            Duration::from_secs(5),
            "the TLS connection is parked",
            || parked() == 1,
        )
        .await;
    }

    let io = TokioIo::new(connect(proxy.addr, &cert, b"h2").await);
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let h2_conn = tokio::spawn(conn);
    assert_eq!(h2.send_request(get()).await.unwrap().status(), 200);
    // Six park periods with the HTTP/2 connection open and quiet: it stays with hyper.
    let window = Duration::from_millis(300);
    throughout(window, "an HTTP/2 connection was parked", || parked() == 1).await;
    assert!(!h2_conn.is_finished(), "the HTTP/2 connection stayed open");
    assert_eq!(h2.send_request(get()).await.unwrap().status(), 200);
}
