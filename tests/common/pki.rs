//! A fresh PKI per test (rcgen): a root CA, an intermediate, a server certificate for
//! 127.0.0.1/localhost, and client leaves shaped by [`LeafSpec`]. Everything is written as PEM
//! into a `TempDir` that is removed when the test ends; nothing is checked in.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::META_CN;

type Ca = CertifiedIssuer<'static, KeyPair>;

/// The serial number [`Pki::reissue_server_cert`] callers use for "the renewed certificate"
/// (first byte below 0x80, so it is a positive DER integer as written).
pub const REISSUED_SERIAL: [u8; 8] = [0x4a, 0x75, 0x62, 0x67, 0x61, 0x74, 0x65, 0x02];

/// A root CA, an intermediate under it, and a server certificate (127.0.0.1, localhost) under
/// the intermediate, written as PEM into a temporary directory:
/// `root.pem`, `intermediate.pem`, `server-chain.pem` (leaf + intermediate), `server.key`.
pub struct Pki {
    pub dir: TempDir,
    ca: OtherCa,
    configs: AtomicUsize,
}

/// A client certificate chain (leaf first) and the leaf's key.
#[derive(Clone)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
}

impl ClientCert {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// SHA-256 of the leaf DER, lower-case hex: what `X-Forwarded-Client-Cert: Hash=` must carry.
    pub fn leaf_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.leaf().as_ref()))
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The same certificate sent without its intermediate.
    pub fn leaf_only(&self) -> ClientCert {
        ClientCert {
            chain: vec![self.chain[0].clone()],
            key_pkcs8: self.key_pkcs8.clone(),
        }
    }

    /// The chain (leaf first) as concatenated PEM blocks.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| cert_pem(c.as_ref())).collect()
    }

    /// The XFCC value hubgate sets for a certificate from [`Pki::meta_client`].
    pub fn meta_xfcc(&self) -> String {
        format!(
            "Hash={};Subject=\"CN={META_CN},O=Meta Platforms\\\\, Inc.,L=Menlo Park,ST=California,C=US\"",
            self.leaf_sha256()
        )
    }
}

/// What to change in a client leaf.
#[derive(Clone)]
pub struct LeafSpec {
    pub cn: String,
    /// Add Meta's O/L/ST/C attributes around the CN (the real certificate has them).
    pub full_meta_dn: bool,
    pub not_before: (i32, u8, u8),
    pub not_after: (i32, u8, u8),
    /// An exact notAfter instead of `not_after`'s date (a certificate that expires mid-test).
    pub not_after_exact: Option<std::time::SystemTime>,
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    /// Leave the CN out of the subject (the SAN still carries `cn`).
    pub omit_cn: bool,
    /// A second CN attribute in the subject.
    pub extra_cn: Option<String>,
    /// More subject attributes, placed before the CN.
    pub subject_extra: Vec<(DnType, String)>,
    /// No subjectAltName at all (the identity is then the CN alone).
    pub no_san: bool,
}

impl LeafSpec {
    pub fn cn(cn: &str) -> LeafSpec {
        LeafSpec {
            cn: cn.to_owned(),
            full_meta_dn: false,
            not_before: (2000, 1, 1),
            not_after: (2090, 1, 1),
            not_after_exact: None,
            eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
            omit_cn: false,
            extra_cn: None,
            subject_extra: Vec::new(),
            no_san: false,
        }
    }

    /// Meta's CN with `f` applied: the usual starting point of a "bad certificate" test.
    pub fn meta(f: impl FnOnce(&mut LeafSpec)) -> LeafSpec {
        let mut spec = LeafSpec::cn(META_CN);
        f(&mut spec);
        spec
    }

    fn params(&self) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if self.full_meta_dn {
            p.distinguished_name.push(DnType::CountryName, "US");
            p.distinguished_name
                .push(DnType::StateOrProvinceName, "California");
            p.distinguished_name
                .push(DnType::LocalityName, "Menlo Park");
            p.distinguished_name
                .push(DnType::OrganizationName, "Meta Platforms, Inc.");
        }
        for (ty, value) in &self.subject_extra {
            p.distinguished_name.push(ty.clone(), value.as_str());
        }
        if !self.omit_cn {
            p.distinguished_name
                .push(DnType::CommonName, self.cn.as_str());
        }
        if let Some(extra) = &self.extra_cn {
            // The CN OID as a "custom" type: rcgen keeps one value per type otherwise.
            p.distinguished_name
                .push(DnType::CustomDnType(vec![2, 5, 4, 3]), extra.as_str());
        }
        if !self.no_san {
            p.subject_alt_names = vec![rcgen::SanType::DnsName(
                self.cn.clone().try_into().expect("CN is a valid DNS name"),
            )];
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = self.eku.clone();
        let (y, m, d) = self.not_before;
        p.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = self.not_after;
        p.not_after = rcgen::date_time_ymd(y, m, d);
        if let Some(t) = self.not_after_exact {
            p.not_after = t.into();
        }
        p.use_authority_key_identifier_extension = true;
        p
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "hubgate tests");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2095, 1, 1);
    p.use_authority_key_identifier_extension = true;
    p
}

/// Server certificate parameters: 127.0.0.1 and localhost, valid 2000–2090.
fn server_params(cn: &str) -> CertificateParams {
    let mut p =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2090, 1, 1);
    p.use_authority_key_identifier_extension = true;
    p
}

fn signed_ca(cn: &str, parent: &Issuer<'_, KeyPair>) -> Ca {
    CertifiedIssuer::signed_by(ca_params(cn), KeyPair::generate().unwrap(), parent).unwrap()
}

const ROOT_CN: &str = "hubgate test root";
const INTERMEDIATE_CN: &str = "hubgate test intermediate";

/// A client CA: a root and an intermediate under it, issuing leaves.
pub struct OtherCa {
    root: Ca,
    intermediate: Ca,
}

impl OtherCa {
    /// A second, independent client CA with its own names (`{name} root`, `{name} intermediate`).
    pub fn new(name: &str) -> OtherCa {
        Self::named(&format!("{name} root"), &format!("{name} intermediate"))
    }

    fn named(root_cn: &str, intermediate_cn: &str) -> OtherCa {
        let root =
            CertifiedIssuer::self_signed(ca_params(root_cn), KeyPair::generate().unwrap()).unwrap();
        let intermediate = signed_ca(intermediate_cn, &root);
        OtherCa { root, intermediate }
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// A leaf issued by this CA's intermediate, chain = [leaf, intermediate].
    pub fn client(&self, spec: &LeafSpec) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let leaf = spec.params().signed_by(&key, &self.intermediate).unwrap();
        ClientCert {
            chain: vec![leaf.der().clone(), self.intermediate.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }
}

impl Pki {
    pub fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("temp dir"),
            ca: OtherCa::named(ROOT_CN, INTERMEDIATE_CN),
            configs: AtomicUsize::new(0),
        };
        pki.write("root.pem", &pki.ca.root.pem());
        pki.write("intermediate.pem", &pki.ca.intermediate.pem());
        pki.issue_server_cert(
            "hubgate test server",
            None,
            "server-chain.pem",
            "server.key",
        );
        pki
    }

    fn issue_server_cert(&self, cn: &str, serial: Option<&[u8]>, chain_name: &str, key_name: &str) {
        let mut params = server_params(cn);
        params.serial_number = serial.map(rcgen::SerialNumber::from_slice);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca.intermediate).unwrap();
        self.write(
            chain_name,
            &format!("{}{}", cert.pem(), self.ca.intermediate.pem()),
        );
        self.write(key_name, &key.serialize_pem());
    }

    /// A new server certificate (127.0.0.1, localhost) under the intermediate with the given
    /// serial number (keep the first byte below 0x80), written as `chain_name` (leaf +
    /// intermediate) and `key_name`.
    pub fn reissue_server_cert(&self, serial: &[u8], chain_name: &str, key_name: &str) {
        self.issue_server_cert(
            "hubgate test server (reissued)",
            Some(serial),
            chain_name,
            key_name,
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }

    /// A fresh file name for the next configuration written here (`hubgate-N.toml`).
    pub fn next_config_name(&self) -> String {
        let n = self.configs.fetch_add(1, Ordering::SeqCst);
        format!("hubgate-{n}.toml")
    }

    /// Writes TOML text as given next to the PEM files and loads it with `Config::load`, so
    /// relative paths resolve against the temp dir. For text whose point is its exact form;
    /// everything else goes through [`super::GateConfig`].
    pub fn load_toml(&self, toml: &str) -> Result<hubgate::Config, hubgate::ConfigError> {
        let path = self.write(&self.next_config_name(), toml);
        hubgate::Config::load(&path)
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.ca.root.der().clone()
    }

    pub fn root_pem(&self) -> String {
        self.ca.root.pem()
    }

    /// A leaf issued by the intermediate, chain = [leaf, intermediate].
    pub fn client(&self, spec: &LeafSpec) -> ClientCert {
        self.ca.client(spec)
    }

    /// A valid client certificate with Meta's full subject (`CN=client.webhooks...,O=Meta
    /// Platforms\, Inc.,L=Menlo Park,ST=California,C=US`).
    pub fn meta_client(&self) -> ClientCert {
        self.client(&LeafSpec::meta(|s| s.full_meta_dn = true))
    }

    /// A leaf under a new intermediate, itself under the test root, whose name constraints
    /// permit and exclude these DNS subtrees; chain = [leaf, constrained intermediate].
    pub fn constrained_client(
        &self,
        spec: &LeafSpec,
        permitted: &[&str],
        excluded: &[&str],
    ) -> ClientCert {
        let mut params = ca_params("hubgate test constrained intermediate");
        let subtree = |d: &&str| rcgen::GeneralSubtree::DnsName((*d).to_owned());
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: permitted.iter().map(subtree).collect(),
            excluded_subtrees: excluded.iter().map(subtree).collect(),
        });
        let ca = CertifiedIssuer::signed_by(params, KeyPair::generate().unwrap(), &self.ca.root)
            .unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = spec.params().signed_by(&key, &ca).unwrap();
        ClientCert {
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }

    /// A CRL (PEM) signed by the test root (`by_root`) or its intermediate, revoking the
    /// certificates with these DER serial numbers, stale after `next_update`.
    pub fn crl(
        &self,
        by_root: bool,
        revoked: &[Vec<u8>],
        next_update: std::time::SystemTime,
    ) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: next_update.into(),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = if by_root {
            &self.ca.root
        } else {
            &self.ca.intermediate
        };
        params.signed_by(issuer).unwrap().pem().unwrap()
    }

    /// The DER serial number of the test intermediate.
    pub fn intermediate_serial(&self) -> Vec<u8> {
        serial_of(self.ca.intermediate.der())
    }

    /// A self-signed leaf (no chain to any configured anchor).
    pub fn self_signed_client(&self, spec: &LeafSpec) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let leaf = spec.params().self_signed(&key).unwrap();
        ClientCert {
            chain: vec![leaf.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }

    /// A leaf under a separate root and intermediate whose names copy the trusted ones
    /// exactly, so only the keys differ.
    pub fn untrusted_client(&self, spec: &LeafSpec) -> ClientCert {
        OtherCa::named(ROOT_CN, INTERMEDIATE_CN).client(spec)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// Standard base64 (with padding), for writing PEM by hand.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A certificate's serial number, as DER writes it.
pub fn serial_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    cert.raw_serial().to_vec()
}

/// One DER certificate as a PEM block.
pub fn cert_pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}
