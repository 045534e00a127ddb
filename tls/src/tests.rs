use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::testing::{PemDir, TestCa};
use super::*;

const BOTH: Roles = Roles {
    serve: true,
    connect: true,
};

/// A node's files: a loopback leaf of `ca`, and `ca` as the trusted CA.
fn node_files(dir: &PemDir, ca: &TestCa, serial: u64) -> TlsFiles {
    let (cert, key) = dir.write_leaf("node", &ca.loopback(serial));
    TlsFiles {
        cert: Some(cert),
        key: Some(key),
        ca: Some(dir.write("ca.pem", ca.cert_pem())),
        auth_clients: AuthClients::Yes,
    }
}

/// One handshake through an in-memory pipe, then a byte each way; the client's error if the
/// handshake fails.
async fn handshake(server: &NodeTls, client: &Connector, addr: &str) -> Result<(), String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let serving = async {
        let mut s = server.accept(b).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        s.write_all(&byte).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())
    };
    let connecting = async {
        let mut c = client.connect(addr, a).await.map_err(|e| e.to_string())?;
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8];
        c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let (s, c) = tokio::join!(serving, connecting);
    c.and(s)
}

#[tokio::test]
async fn a_node_talks_to_itself_by_ip_and_by_name() {
    let ca = TestCa::new("ca");
    let dir = PemDir::new("self");
    let node = NodeTls::load(node_files(&dir, &ca, 1), BOTH).unwrap();
    let links = node.connector().unwrap();
    handshake(&node, &links, "127.0.0.1:7001").await.unwrap();
    handshake(&node, &links, "localhost:7001").await.unwrap();
    // A name the certificate does not carry is refused.
    let err = handshake(&node, &links, "10.1.2.3:7001").await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn a_required_client_certificate_is_checked() {
    let ca = TestCa::new("ca");
    let dir = PemDir::new("mtls");
    let files = node_files(&dir, &ca, 1);
    let ca_file = files.ca.clone().unwrap();
    let server = NodeTls::load(
        files,
        Roles {
            serve: true,
            connect: false,
        },
    )
    .unwrap();
    let anonymous = Connector::from_ca_file(&ca_file).unwrap();
    assert!(handshake(&server, &anonymous, "127.0.0.1:1").await.is_err());
    let (cert, key) = dir.write_leaf("client", &ca.issue(&["app"], 7));
    let known = Connector::from_files(&ca_file, &cert, &key).unwrap();
    handshake(&server, &known, "127.0.0.1:1").await.unwrap();
    let other = TestCa::new("other");
    let (cert, key) = dir.write_leaf("stranger", &other.issue(&["app"], 8));
    let stranger = Connector::from_files(&ca_file, &cert, &key).unwrap();
    assert!(handshake(&server, &stranger, "127.0.0.1:1").await.is_err());
}

#[tokio::test]
async fn reload_swaps_in_new_files_and_keeps_the_old_on_error() {
    let (old_ca, new_ca) = (TestCa::new("old"), TestCa::new("new"));
    let dir = PemDir::new("reload");
    let mut files = node_files(&dir, &old_ca, 1);
    files.auth_clients = AuthClients::No;
    let node = NodeTls::load(files, BOTH).unwrap();
    let trusts_old = Connector::from_ca_file(dir.path().join("ca.pem")).unwrap();
    let new_ca_file = dir.write("new-ca.pem", new_ca.cert_pem());
    let trusts_new = Connector::from_ca_file(&new_ca_file).unwrap();
    handshake(&node, &trusts_old, "127.0.0.1:1").await.unwrap();

    // A key that is not the certificate's: refused, and the node keeps serving the old one.
    dir.write("node.key", &old_ca.loopback(2).key);
    let err = node.reload().unwrap_err();
    assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
    handshake(&node, &trusts_old, "127.0.0.1:1").await.unwrap();

    dir.write_leaf("node", &new_ca.loopback(3));
    dir.write("ca.pem", new_ca.cert_pem());
    node.reload().unwrap();
    handshake(&node, &trusts_new, "127.0.0.1:1").await.unwrap();
    assert!(handshake(&node, &trusts_old, "127.0.0.1:1").await.is_err());
    // The links follow the reload: they now trust the new CA.
    handshake(&node, &node.connector().unwrap(), "127.0.0.1:1")
        .await
        .unwrap();
}

#[test]
fn bad_files_say_which_and_why() {
    let ca = TestCa::new("ca");
    let dir = PemDir::new("bad");
    let good = node_files(&dir, &ca, 1);
    let load = |files: TlsFiles| NodeTls::load(files, BOTH).unwrap_err().to_string();

    let missing = TlsFiles {
        cert: Some(dir.path().join("nope.pem")),
        ..good.clone()
    };
    let msg = load(missing);
    assert!(
        msg.contains("cannot read --tls-cert-file") && msg.contains("nope.pem"),
        "{msg}"
    );

    let text = dir.write("text.pem", "hello\n");
    let msg = load(TlsFiles {
        cert: Some(text.clone()),
        ..good.clone()
    });
    assert!(msg.contains("holds no PEM certificate"), "{msg}");
    let msg = load(TlsFiles {
        key: Some(text.clone()),
        ..good.clone()
    });
    assert!(msg.contains("holds no private key"), "{msg}");
    let msg = load(TlsFiles {
        ca: Some(text),
        ..good.clone()
    });
    assert!(msg.contains("--tls-ca-cert-file"), "{msg}");

    let (_, other_key) = dir.write_leaf("other", &ca.loopback(2));
    let msg = load(TlsFiles {
        key: Some(other_key),
        ..good.clone()
    });
    assert!(msg.contains("does not belong to the certificate"), "{msg}");

    let msg = load(TlsFiles {
        ca: None,
        ..good.clone()
    });
    assert!(msg.contains("--tls-ca-cert-file"), "{msg}");
    let msg = load(TlsFiles { key: None, ..good });
    assert!(msg.contains("go together"), "{msg}");
}

#[test]
fn hosts_come_out_of_addresses() {
    assert_eq!(host_of("127.0.0.1:7001"), "127.0.0.1");
    assert_eq!(host_of("cache.internal:7001"), "cache.internal");
    assert_eq!(host_of("[::1]:7001"), "::1");
    assert_eq!(host_of("::1"), "::1");
    assert_eq!(host_of("localhost"), "localhost");
    assert!(matches!(
        parse_server_name("::1").unwrap(),
        ServerName::IpAddress(_)
    ));
    assert!(parse_server_name("not a name").is_err());
}
