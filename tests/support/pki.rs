//! A certificate authority made in the test (rcgen) and the PEM files etcd, Envoy and
//! handoffctl need: a server certificate for 127.0.0.1 and localhost, client certificates
//! with and without a Common Name, and one signed by another CA.
#![allow(dead_code)]

use super::etcd::Tls;

/// A CA, a server certificate for 127.0.0.1 and client certificates, written as PEM files.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "handoff test CA");
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, sans: Vec<String>, cn: Option<&str>| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                p.distinguished_name.push(DnType::CommonName, cn);
            }
            write(
                &format!("{name}.pem"),
                p.signed_by(&key, &issuer).unwrap().pem(),
            );
            write(&format!("{name}-key.pem"), key.serialize_pem());
        };
        leaf("server", vec!["127.0.0.1".into(), "localhost".into()], None);
        // Through etcd's JSON gateway a client certificate must not carry a Common Name once
        // authentication is on (the gateway does not authenticate by CN).
        leaf("client", vec![], None);
        leaf("client-cn", vec![], Some("handoff"));
        // Another CA's client certificate: refused by --client-cert-auth.
        let other_key = KeyPair::generate().unwrap();
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = Issuer::new(other, other_key);
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(Vec::<String>::new()).unwrap();
        write("stranger.pem", p.signed_by(&key, &other).unwrap().pem());
        write("stranger-key.pem", key.serialize_pem());
        Pki { dir }
    }

    /// `--cacert` and the client certificate `name`'s `--cert` and `--key`.
    pub fn flags(&self, name: &str) -> Vec<String> {
        let mut flags = vec!["--cacert".to_string(), self.path("ca.pem")];
        flags.extend(["--cert".to_string(), self.path(&format!("{name}.pem"))]);
        flags.extend(["--key".to_string(), self.path(&format!("{name}-key.pem"))]);
        flags
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// An HTTPS client trusting the CA, presenting the client certificate `name`.
    pub fn agent(&self, name: &str) -> ureq::Agent {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
        let read = |f: String| std::fs::read(self.path(&f)).unwrap();
        let ca = Certificate::from_pem(&read("ca.pem".into())).unwrap();
        let cert = Certificate::from_pem(&read(format!("{name}.pem"))).unwrap();
        let key = PrivateKey::from_pem(&read(format!("{name}-key.pem"))).unwrap();
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::new_with_certs(&[ca]))
            .client_cert(Some(ClientCert::new_with_certs(&[cert], key)))
            .build();
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .tls_config(tls)
                .http_status_as_error(false)
                .build(),
        )
    }

    pub fn tls(&self) -> Tls {
        Tls {
            cert: self.dir.path().join("server.pem"),
            key: self.dir.path().join("server-key.pem"),
            ca: self.dir.path().join("ca.pem"),
            client_cert_auth: true,
        }
    }
}
