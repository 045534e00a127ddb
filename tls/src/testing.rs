//! Certificates for tests (feature `testing`): a CA that signs leaves for loopback, written
//! to PEM files the way an operator's would be.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};

/// A CA made on the spot.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, as PEM text.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// The CA's certificate (PEM), what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A leaf for `names` (host names and IP addresses, each a subject alternative name),
    /// with serial number `serial`. It carries no extended key usage, so it serves as a
    /// server and as a client certificate alike.
    pub fn issue(&self, names: &[&str], serial: u64) -> Leaf {
        let key = KeyPair::generate().expect("generate a leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "twincache test");
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A leaf for 127.0.0.1 and localhost.
    pub fn loopback(&self, serial: u64) -> Leaf {
        self.issue(&["127.0.0.1", "localhost"], serial)
    }
}

/// A directory of PEM files, removed when dropped.
pub struct PemDir {
    dir: PathBuf,
}

impl PemDir {
    pub fn new(tag: &str) -> PemDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "twincache-tls-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        PemDir { dir }
    }

    /// Writes `contents` to `name` in the directory, atomically (a reload never reads a
    /// half-written file), and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write a PEM file");
        std::fs::rename(&tmp, &path).expect("move a PEM file into place");
        path
    }

    /// Writes `leaf` as `<name>.pem` and `<name>.key`; returns both paths.
    pub fn write_leaf(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.pem"), &leaf.cert),
            self.write(&format!("{name}.key"), &leaf.key),
        )
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PemDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
