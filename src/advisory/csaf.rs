//! Red Hat CSAF VEX documents (one per CVE, `category: csaf_vex`), or an array of
//! them. A status list names product ids; a relationship id
//! (`AppStream-9.2.0.Z.MAIN:openssl-1:3.0.7-18.el9_2.src`) joins a component to the
//! platform it ships in. The platform's CPE (`cpe:/a:redhat:enterprise_linux:9::…`)
//! says the release: only plain `enterprise_linux:N` streams count, so EUS and
//! other streams are not read as RHEL N. Of a component, only source RPMs
//! (`arch=src`) and bare names (as `known_affected` lists them) are read: the
//! binaries of a source package carry no other verdict.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::Value;

use super::{AdvisoryError, Distro, FixState, Release, Severity, Statement};

#[derive(Debug, Deserialize)]
struct Csaf {
    #[serde(default)]
    document: Document,
    #[serde(default)]
    product_tree: ProductTree,
    #[serde(default)]
    vulnerabilities: Vec<Vulnerability>,
}

#[derive(Debug, Default, Deserialize)]
struct Document {
    #[serde(default)]
    aggregate_severity: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
struct Text {
    #[serde(default)]
    text: String,
}

#[derive(Debug, Default, Deserialize)]
struct ProductTree {
    #[serde(default)]
    branches: Vec<Branch>,
    #[serde(default)]
    relationships: Vec<Relationship>,
}

#[derive(Debug, Deserialize)]
struct Branch {
    #[serde(default)]
    product: Option<Product>,
    #[serde(default)]
    branches: Vec<Branch>,
}

#[derive(Debug, Deserialize)]
struct Product {
    product_id: String,
    #[serde(default)]
    product_identification_helper: Option<Helper>,
}

#[derive(Debug, Deserialize)]
struct Helper {
    #[serde(default)]
    cpe: Option<String>,
    #[serde(default)]
    purl: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Relationship {
    full_product_name: Product,
    product_reference: String,
    relates_to_product_reference: String,
}

#[derive(Debug, Deserialize)]
struct Vulnerability {
    #[serde(default)]
    cve: Option<String>,
    #[serde(default)]
    product_status: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    threats: Vec<Threat>,
}

#[derive(Debug, Deserialize)]
struct Threat {
    #[serde(default)]
    category: String,
    #[serde(default)]
    details: String,
}

pub fn read(source: &str, value: Value) -> Result<Vec<Statement>, AdvisoryError> {
    let docs = match value {
        Value::Array(items) => items,
        one => vec![one],
    };
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let doc: Csaf = serde_json::from_value(doc).map_err(|e| AdvisoryError::Parse {
            feed: source.to_string(),
            reason: format!("CSAF document {i}: {e}"),
        })?;
        read_doc(&doc, &mut out);
    }
    Ok(out)
}

fn walk<'a>(branches: &'a [Branch], into: &mut HashMap<&'a str, &'a Product>) {
    for b in branches {
        if let Some(p) = &b.product {
            into.insert(p.product_id.as_str(), p);
        }
        walk(&b.branches, into);
    }
}

/// `enterprise_linux:9` in a CPE (`cpe:/o:redhat:enterprise_linux:9::baseos`).
fn release_of_cpe(cpe: &str) -> Option<Release> {
    let mut parts = cpe.split(':');
    let (_, _, vendor, product, version) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (vendor == "redhat"
        && product == "enterprise_linux"
        && !version.is_empty()
        && version.chars().all(|c| c.is_ascii_digit()))
    .then(|| Release::new(Distro::Rhel, version))
}

/// A component: (source package name, `epoch:version-release` when given).
fn component(id: &str, products: &HashMap<&str, &Product>) -> Option<(String, Option<String>)> {
    let purl = products
        .get(id)
        .and_then(|p| p.product_identification_helper.as_ref())
        .and_then(|h| h.purl.as_deref());
    if let Some(purl) = purl {
        return from_purl(purl);
    }
    from_nevra(id)
}

/// `pkg:rpm/redhat/openssl@3.0.7-18.el9_2?arch=src&epoch=1`.
fn from_purl(purl: &str) -> Option<(String, Option<String>)> {
    let rest = purl.strip_prefix("pkg:rpm/")?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let name_ver = path.rsplit('/').next()?;
    let (name, version) = match name_ver.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (name_ver, None),
    };
    let mut arch = None;
    let mut epoch = None;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("arch", a)) => arch = Some(a),
            Some(("epoch", e)) => epoch = Some(e),
            _ => {}
        }
    }
    if version.is_some() && arch != Some("src") {
        return None;
    }
    let version = version.map(|v| match epoch {
        Some(e) => format!("{e}:{v}"),
        None => v.to_string(),
    });
    Some((name.to_string(), version))
}

/// `openssl-1:3.0.7-18.el9_2.src` or a bare `openssl`.
fn from_nevra(id: &str) -> Option<(String, Option<String>)> {
    let Some(nvr) = id.strip_suffix(".src") else {
        // A bare name (no version, no arch) as `known_affected` lists them; a
        // binary NEVRA is left out.
        return (!id.contains(['.', ':'])).then(|| (id.to_string(), None));
    };
    let (nv, release) = nvr.rsplit_once('-')?;
    let (name, version) = nv.rsplit_once('-')?;
    Some((name.to_string(), Some(format!("{version}-{release}"))))
}

fn read_doc(doc: &Csaf, out: &mut Vec<Statement>) {
    let mut products = HashMap::new();
    walk(&doc.product_tree.branches, &mut products);
    let relations: HashMap<&str, &Relationship> = doc
        .product_tree
        .relationships
        .iter()
        .map(|r| (r.full_product_name.product_id.as_str(), r))
        .collect();
    let release_of = |platform: &str| {
        products
            .get(platform)
            .and_then(|p| p.product_identification_helper.as_ref())
            .and_then(|h| h.cpe.as_deref())
            .and_then(release_of_cpe)
    };
    let doc_severity = doc
        .document
        .aggregate_severity
        .as_ref()
        .map(|t| Severity::parse(&t.text))
        .unwrap_or_default();
    for v in &doc.vulnerabilities {
        let Some(cve) = v.cve.as_deref().map(std::sync::Arc::<str>::from) else {
            continue;
        };
        let severity = v
            .threats
            .iter()
            .find(|t| t.category == "impact")
            .map(|t| Severity::parse(&t.details))
            .filter(|s| *s != Severity::Unknown)
            .unwrap_or(doc_severity);
        // (release, package) → state; several fixed builds of one stream keep the
        // lowest, the first that closes the CVE.
        let mut found: BTreeMap<(Release, String), FixState> = BTreeMap::new();
        for (status, ids) in &v.product_status {
            for id in ids {
                let Some(rel) = relations.get(id.as_str()) else {
                    continue;
                };
                let Some(release) = release_of(&rel.relates_to_product_reference) else {
                    continue;
                };
                let Some((name, version)) = component(&rel.product_reference, &products) else {
                    continue;
                };
                let state = match (status.as_str(), version) {
                    ("fixed" | "first_fixed", Some(v)) => FixState::Fixed(v.into()),
                    ("known_affected", _) => FixState::NoFix,
                    ("known_not_affected", _) => FixState::NotAffected,
                    _ => continue,
                };
                let key = (release, name);
                let keep = match (found.get(&key), &state) {
                    (None, _) => true,
                    (Some(FixState::Fixed(old)), FixState::Fixed(new)) => {
                        Distro::Rhel.compare(new, old).is_lt()
                    }
                    // A fix anywhere in the stream beats "affected" elsewhere in it.
                    (Some(FixState::NoFix | FixState::NotAffected), FixState::Fixed(_)) => true,
                    _ => false,
                };
                if keep {
                    found.insert(key, state);
                }
            }
        }
        for ((release, package), state) in found {
            out.push(Statement {
                cve: cve.clone(),
                release,
                package: package.into(),
                introduced: None,
                state,
                severity,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purls_and_nevras_give_source_name_and_evr() {
        assert_eq!(
            from_purl("pkg:rpm/redhat/openssl@3.0.7-18.el9_2?arch=src&epoch=1"),
            Some(("openssl".into(), Some("1:3.0.7-18.el9_2".into())))
        );
        assert_eq!(
            from_purl("pkg:rpm/redhat/openssl@3.0.7-18.el9_2?arch=x86_64"),
            None
        );
        assert_eq!(
            from_purl("pkg:rpm/redhat/openssl"),
            Some(("openssl".into(), None))
        );
        assert_eq!(
            from_nevra("openssl-1:3.0.7-18.el9_2.src"),
            Some(("openssl".into(), Some("1:3.0.7-18.el9_2".into())))
        );
        assert_eq!(from_nevra("kernel"), Some(("kernel".into(), None)));
        assert_eq!(from_nevra("kernel-5.14.0-1.el9.x86_64"), None);
        assert_eq!(
            release_of_cpe("cpe:/a:redhat:enterprise_linux:9::appstream"),
            Some(Release::new(Distro::Rhel, "9"))
        );
        assert_eq!(
            release_of_cpe("cpe:/a:redhat:rhel_eus:9.2::appstream"),
            None
        );
    }
}
