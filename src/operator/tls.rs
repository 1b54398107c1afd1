//! TLS for the lease API. The leader keeps a CA and a serving certificate in
//! a Secret of its own namespace (creating them on first use): the CA lives
//! ten years and is what data-plane pods trust (handed to them in their pod
//! templates); the serving certificate lives a year and is re-issued from the
//! same CA a month before it expires, so pods never need a new CA to keep
//! talking to the leader.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const SERVING_CERT: &str = "tls.crt";
const SERVING_KEY: &str = "tls.key";
/// When the serving certificate stops being valid (RFC 3339).
const NOT_AFTER_ANNOTATION: &str = "kiln.dev/serving-not-after";
/// The names the serving certificate holds, comma-separated.
const NAMES_ANNOTATION: &str = "kiln.dev/serving-names";

const CA_LIFETIME: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 3650);
const SERVING_LIFETIME: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 365);
/// A serving certificate is re-issued when it has less than this left.
const RENEW_BEFORE: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 30);
/// How often the leader checks whether to re-issue.
pub const CHECK_EVERY: Duration = Duration::from_secs(6 * 3600);

/// The start of `at`'s UTC day, as certificates count validity here.
macro_rules! day {
    ($at:expr) => {{
        let date = ($at).to_zoned(jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(i32::from(date.year()), date.month() as u8, date.day() as u8)
    }};
}

/// The PEM material in the Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingMaterial {
    pub ca_cert: String,
    ca_key: String,
    pub cert: String,
    key: String,
    not_after: jiff::Timestamp,
    names: Vec<String>,
}

impl ServingMaterial {
    /// A new CA and a serving certificate for `names` signed by it.
    pub fn generate(names: &[String], now: jiff::Timestamp) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut params = ca_params()?;
        params.not_before = day!(now - jiff::SignedDuration::from_hours(24));
        params.not_after = day!(now + CA_LIFETIME);
        let ca_cert = params.self_signed(&ca_key)?.pem();
        Self::issue(ca_cert, ca_key.serialize_pem(), names, now)
    }

    /// A serving certificate for `names` from this material's CA.
    fn reissue(&self, names: &[String], now: jiff::Timestamp) -> anyhow::Result<Self> {
        Self::issue(self.ca_cert.clone(), self.ca_key.clone(), names, now)
    }

    fn issue(
        ca_cert: String,
        ca_key_pem: String,
        names: &[String],
        now: jiff::Timestamp,
    ) -> anyhow::Result<Self> {
        // Signing needs the CA's name and key, both as stored.
        let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_key_pem)?);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "kiln-lease-api");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let not_after = now + SERVING_LIFETIME;
        params.not_before = day!(now - jiff::SignedDuration::from_hours(24));
        params.not_after = day!(not_after);
        let cert = params.signed_by(&key, &issuer)?.pem();
        Ok(Self {
            ca_cert,
            ca_key: ca_key_pem,
            cert,
            key: key.serialize_pem(),
            not_after,
            names: names.to_vec(),
        })
    }

    /// What to serve with now: this material, a re-issued serving
    /// certificate (expiring soon, or for other names), or None when kept.
    pub fn renewed(&self, names: &[String], now: jiff::Timestamp) -> anyhow::Result<Option<Self>> {
        let expiring = self.not_after - RENEW_BEFORE < now;
        if expiring || self.names != names {
            return self.reissue(names, now).map(Some);
        }
        Ok(None)
    }

    /// A rustls server configuration serving this certificate.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let chain = CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the serving certificate")?;
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .context("parsing the serving key")?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Ok(Arc::new(config))
    }

    fn to_secret(&self, name: &str) -> Secret {
        let data = [
            (CA_CERT, &self.ca_cert),
            (CA_KEY, &self.ca_key),
            (SERVING_CERT, &self.cert),
            (SERVING_KEY, &self.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
        .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                annotations: Some(BTreeMap::from([
                    (NOT_AFTER_ANNOTATION.to_string(), self.not_after.to_string()),
                    (NAMES_ANNOTATION.to_string(), self.names.join(",")),
                ])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        let annotations = secret.metadata.annotations.as_ref()?;
        Some(Self {
            ca_cert: text(CA_CERT)?,
            ca_key: text(CA_KEY)?,
            cert: text(SERVING_CERT)?,
            key: text(SERVING_KEY)?,
            not_after: annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?,
            names: annotations
                .get(NAMES_ANNOTATION)?
                .split(',')
                .map(str::to_string)
                .collect(),
        })
    }
}

/// The CA's subject and constraints (its validity is set where it is made).
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kiln-lease-api-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// The names a serving certificate for `operator_url` holds: its host, the
/// same Service name with `.cluster.local`, and loopback (for port-forwards
/// and local runs).
pub fn serving_names(operator_url: &str) -> Vec<String> {
    let host = operator_url
        .split("://")
        .nth(1)
        .unwrap_or(operator_url)
        .split(['/', ':'])
        .next()
        .unwrap_or_default()
        .to_string();
    let mut names = vec![host.clone()];
    if host.ends_with(".svc") {
        names.push(format!("{host}.cluster.local"));
    }
    for local in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == local) {
            names.push(local.to_string());
        }
    }
    names
}

/// Reads the Secret, creating or re-issuing what is missing or expiring;
/// returns what to serve with. Two replicas racing: one create wins, the
/// other reads what it wrote.
pub async fn ensure(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
    names: &[String],
) -> anyhow::Result<ServingMaterial> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let now = jiff::Timestamp::now();
    for _ in 0..3 {
        match api.get_opt(secret).await? {
            None => {
                let material = ServingMaterial::generate(names, now)?;
                match api
                    .create(&PostParams::default(), &material.to_secret(secret))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(%secret, "created the lease API's CA and serving certificate");
                        return Ok(material);
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(error) => return Err(error.into()),
                }
            }
            Some(existing) => {
                let Some(current) = ServingMaterial::from_secret(&existing) else {
                    anyhow::bail!(
                        "Secret {namespace}/{secret} does not hold Kiln's lease API certificates \
                         (ca.crt, ca.key, tls.crt, tls.key and its annotations); delete it and Kiln creates a new one"
                    );
                };
                let Some(renewed) = current.renewed(names, now)? else {
                    return Ok(current);
                };
                let mut replacement = renewed.to_secret(secret);
                replacement.metadata.resource_version = existing.metadata.resource_version;
                match api
                    .replace(secret, &PostParams::default(), &replacement)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(%secret, "re-issued the lease API's serving certificate");
                        return Ok(renewed);
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(error) => return Err(error.into()),
                }
            }
        }
    }
    anyhow::bail!("Secret {namespace}/{secret} kept changing while Kiln read it")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        "2026-11-27T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn names_come_from_the_operator_url() {
        assert_eq!(
            serving_names("https://kiln.kiln-system.svc:8443"),
            vec![
                "kiln.kiln-system.svc",
                "kiln.kiln-system.svc.cluster.local",
                "localhost",
                "127.0.0.1"
            ]
        );
        assert_eq!(
            serving_names("https://127.0.0.1:9000"),
            vec!["127.0.0.1", "localhost"]
        );
    }

    #[test]
    fn material_survives_the_secret_and_serves() {
        let names = serving_names("https://kiln.kiln-system.svc:8443");
        let material = ServingMaterial::generate(&names, now()).unwrap();
        let back = ServingMaterial::from_secret(&material.to_secret("kiln-tls")).unwrap();
        assert_eq!(back, material);
        back.server_config().unwrap();
    }

    #[test]
    fn the_serving_certificate_is_reissued_from_the_same_ca_before_it_expires() {
        let names = vec!["kiln.kiln-system.svc".to_string()];
        let material = ServingMaterial::generate(&names, now()).unwrap();
        assert_eq!(
            material.renewed(&names, now()).unwrap(),
            None,
            "fresh: kept"
        );
        let late = now() + SERVING_LIFETIME - jiff::SignedDuration::from_hours(24 * 29);
        let renewed = material.renewed(&names, late).unwrap().expect("re-issued");
        assert_eq!(
            renewed.ca_cert, material.ca_cert,
            "pods keep trusting the same CA"
        );
        assert_ne!(renewed.cert, material.cert);
        let other_names = vec!["kiln.other.svc".to_string()];
        assert!(
            material.renewed(&other_names, now()).unwrap().is_some(),
            "new names: re-issued"
        );
    }
}
