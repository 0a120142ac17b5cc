//! Certificates for the simulator, made with rcgen the way the gateway's
//! generator makes them (WIRE.md B24): a root CA, and a server certificate
//! signed by it whose names are SANs only (DNS and IP), EKU server + client.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// PEM material of a generated CA and server certificate.
#[derive(Clone)]
pub struct SimCerts {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl std::fmt::Debug for SimCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimCerts { .. }")
    }
}

/// Names the simulator's server certificate covers by default.
pub const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];

/// Generates a fresh CA and a server certificate for `sans` (DNS names and IP
/// addresses; rcgen makes an IP SAN of anything that parses as an address).
pub fn generate(sans: &[&str]) -> Result<SimCerts, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "usersync simulated gateway CA");
    ca_params.distinguished_name = dn;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let server_key = KeyPair::generate()?;
    let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = DistinguishedName::new();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&server_key, &ca)?;

    Ok(SimCerts {
        ca_pem: ca.pem(),
        server_cert_pem: cert.pem(),
        server_key_pem: server_key.serialize_pem(),
    })
}

impl SimCerts {
    /// Writes `ca.crt` (0644: it is public) into `dir`, creating the
    /// directory. The server key stays in memory only.
    pub fn write_ca(&self, dir: &Path) -> std::io::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("ca.crt");
        std::fs::write(&path, &self.ca_pem)?;
        Ok(path)
    }
}
