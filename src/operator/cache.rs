//! Objects a controller reads, cached by the same watches that trigger its
//! reconciles, so a reconcile reads memory instead of the API server. Its
//! children are applied only when what the operator wants of them changed,
//! or when someone else changed them since the operator last applied them:
//! a reconcile of an unchanged object writes nothing.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::Stream;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DeleteParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use sha2::{Digest, Sha256};

use super::apply::apply;
use super::error::{AtStep, Result, Step, describe_object};
use super::labels::keep_read_labels;
use super::slim::Slim;

/// What the operator last applied to a child: a hash of the desired
/// object, and the child's version right after. Kept as fixed-size digests:
/// there is one per child, thousands at scale.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Applied {
    desired: [u8; 16],
    version: Version,
}

/// One kind of child: a reflector's store of its slim form (what the
/// operator reads of it) plus what was last applied.
pub struct Children<K, Spec = IgnoredAny, Status = IgnoredAny>
where
    K: k8s_openapi::Resource + 'static,
    Spec: 'static,
    Status: 'static,
{
    store: Store<Slim<K, Spec, Status>>,
    applied: Mutex<HashMap<SlimRef<K, Spec, Status>, Applied>>,
}

/// A cached child's key.
type SlimRef<K, Spec, Status> = ObjectRef<Slim<K, Spec, Status>>;

/// What a watch stream yields: a changed object, or the watch's error.
type Changed<K> = Result<K, watcher::Error>;

impl<K, Spec, Status> Children<K, Spec, Status>
where
    K: k8s_openapi::Resource<Scope = NamespaceResourceScope>
        + k8s_openapi::Metadata<Ty = ObjectMeta>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
    Spec: Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    Status: Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    /// The cache and the watch stream that fills it (give it to the
    /// controller's `owns_stream`). Whether to apply a child again depends
    /// only on its metadata, of which the cache keeps what the operator
    /// reads ([`keep_read_metadata`]).
    pub fn watch(
        api: Api<Slim<K, Spec, Status>>,
        config: watcher::Config,
    ) -> (
        Arc<Self>,
        impl Stream<Item = Changed<Slim<K, Spec, Status>>> + Send + 'static,
    ) {
        let (store, stream) = cached(api, config, keep_read_metadata);
        let children = Arc::new(Self {
            store,
            applied: Mutex::new(HashMap::new()),
        });
        (children, stream)
    }

    /// Applies `desired` unless the cached child is exactly what the
    /// operator applied last for the same desired state; returns the child.
    pub async fn apply(&self, client: &Client, desired: &K) -> Result<Arc<Slim<K, Spec, Status>>> {
        let key =
            ObjectRef::new(&desired.name_any()).within(&desired.namespace().unwrap_or_default());
        let fingerprint = fingerprint(desired);
        let cached = self.store.get(&key);
        if let Some(child) = &cached {
            let last = self.applied.lock().unwrap().get(&key).copied();
            if last.is_some_and(|last| {
                last.desired == fingerprint && last.version == version(&**child)
            }) {
                return Ok(child.clone());
            }
        }
        let child = Slim::of(&apply(client, desired).await?);
        self.applied.lock().unwrap().insert(
            key,
            Applied {
                desired: fingerprint,
                version: version(&child),
            },
        );
        Ok(Arc::new(child))
    }

    /// Waits until the cache holds what the first list returned.
    pub async fn ready(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// Cached children in `namespace` whose labels include all of `labels`.
    pub fn labelled(
        &self,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Vec<Arc<Slim<K, Spec, Status>>> {
        self.store.state_filter(|child| {
            child.namespace().as_deref() == Some(namespace)
                && labels
                    .iter()
                    .all(|(k, v)| child.labels().get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Deletes the cached children in `namespace` labelled with all of
    /// `labels` whose names are not in `keep`; returns their names.
    pub async fn delete_unwanted(
        &self,
        client: &Client,
        namespace: &str,
        labels: &[(&str, &str)],
        keep: &[String],
    ) -> Result<Vec<String>> {
        let api = Api::<K>::namespaced(client.clone(), namespace);
        let mut deleted = Vec::new();
        for child in self.labelled(namespace, labels) {
            let name = child.name_any();
            if keep.contains(&name) {
                continue;
            }
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                // Already gone: the cache had not seen it yet.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(e).at(Step::Delete, || describe_object(&*child));
                }
            }
            self.applied
                .lock()
                .unwrap()
                .remove(&ObjectRef::from_obj(&*child));
            deleted.push(name);
        }
        Ok(deleted)
    }
}

/// A store of `K` kept current by a watch, and the stream of changed
/// objects that drives it (give it to a controller). `slim` trims each
/// object before it is stored; managed fields are always dropped (they are
/// most of an object's size and nothing reads them).
pub fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    slim: impl Fn(&mut K) + Send + Sync + 'static,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    ObjectRef<K>: Hash + Eq,
{
    let (store, writer) = reflector::store();
    let events = reflector::reflector(
        writer,
        watcher(api, config)
            .default_backoff()
            .modify(move |object: &mut K| {
                object.managed_fields_mut().clear();
                slim(object);
            }),
    );
    let stream = stored_objects(events, store.clone());
    (store, stream)
}

/// The objects a watch changed, each emitted once `store` holds it. The
/// objects of a (re)list reach the store only when the list is complete,
/// so they are emitted then: emitted as they arrive, a new object's
/// trigger would find the store without it, the controller would drop it,
/// and nothing would trigger that object again.
fn stored_objects<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    store: Store<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    ObjectRef<K>: Hash + Eq,
{
    use futures::StreamExt as _;
    use futures::future::ready;
    events
        .scan(Vec::new(), move |listed, event| {
            let now = |objects: Vec<Result<K, watcher::Error>>| {
                futures::stream::iter(objects).left_stream()
            };
            let emitted = match event {
                Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => {
                    now(vec![Ok(object)])
                }
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    now(Vec::new())
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listed.push(ObjectRef::from_obj(&object));
                    now(Vec::new())
                }
                // One at a time, as the controller takes them.
                Ok(watcher::Event::InitDone) => {
                    let store = store.clone();
                    futures::stream::iter(std::mem::take(listed))
                        .filter_map(move |key| {
                            ready(store.get(&key).map(|object| Ok((*object).clone())))
                        })
                        .right_stream()
                }
                Err(error) => now(vec![Err(error)]),
            };
            ready(Some(emitted))
        })
        .flatten()
}

/// Drops an object's annotations, for kinds whose annotations the operator
/// never reads: `kubectl apply` leaves a copy of the whole object in one.
pub fn without_annotations<K: Resource>(object: &mut K) {
    object.meta_mut().annotations = None;
}

/// Keeps of a child's metadata what the operator reads of it: no
/// annotations (it sets none on children, and never reads others'), and
/// only the labels it selects by.
pub fn keep_read_metadata<K: Resource>(child: &mut K) {
    without_annotations(child);
    keep_read_labels(&mut child.meta_mut().labels);
}

/// Changes whenever anything the operator sets on the object changes.
fn fingerprint<K: Serialize>(desired: &K) -> [u8; 16] {
    let bytes = serde_json::to_vec(desired).unwrap_or_default();
    digest16(&bytes)
}

fn digest16(bytes: &[u8]) -> [u8; 16] {
    let mut digest = [0; 16];
    digest.copy_from_slice(&Sha256::digest(bytes)[..16]);
    digest
}

/// What changes when anyone changes the object's spec.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    Generation(i64),
    /// For kinds without a generation: a digest of the resourceVersion
    /// (an opaque string).
    Resource([u8; 16]),
}

fn version<K: Resource>(object: &K) -> Version {
    let meta = object.meta();
    match meta.generation {
        Some(generation) => Version::Generation(generation),
        None => Version::Resource(digest16(
            meta.resource_version
                .as_deref()
                .unwrap_or_default()
                .as_bytes(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::ObjectMeta;

    fn account(label: &str) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("kiln-leads".into()),
                namespace: Some("sales".into()),
                labels: Some([("app".to_string(), label.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_fingerprint_follows_the_desired_object() {
        assert_eq!(fingerprint(&account("a")), fingerprint(&account("a")));
        assert_ne!(fingerprint(&account("a")), fingerprint(&account("b")));
    }

    #[test]
    fn the_version_is_the_generation_when_there_is_one() {
        let mut object = account("a");
        object.metadata.resource_version = Some("41".into());
        let at_41 = version(&object);
        object.metadata.resource_version = Some("42".into());
        assert_ne!(version(&object), at_41);
        object.metadata.generation = Some(3);
        assert_eq!(version(&object), Version::Generation(3));
        object.metadata.resource_version = Some("43".into());
        assert_eq!(version(&object), Version::Generation(3));
    }

    fn named(name: &str) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("sales".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_relists_objects_are_emitted_once_the_store_holds_them() {
        use futures::StreamExt as _;
        use watcher::Event;
        let (store, writer) = reflector::store();
        let events = futures::stream::iter([
            Event::Init,
            Event::InitApply(named("a")),
            Event::InitApply(named("b")),
            Event::InitDone,
            Event::Apply(named("c")),
            // A relist after a watch error: "d" is new to the store.
            Event::Init,
            Event::InitApply(named("c")),
            Event::InitApply(named("d")),
            Event::InitDone,
        ])
        .map(Ok);
        let emitted = stored_objects(reflector::reflector(writer, events), store.clone());
        futures::pin_mut!(emitted);
        let mut names = Vec::new();
        while let Some(object) = emitted.next().await {
            let object = object.unwrap();
            // What a controller looks up when the trigger arrives.
            assert!(
                store.get(&ObjectRef::from_obj(&object)).is_some(),
                "{} emitted before the store held it",
                object.name_any()
            );
            names.push(object.name_any());
        }
        assert_eq!(names, ["a", "b", "c", "c", "d"]);
    }
}
