#!/usr/bin/env bash
# Brings up a one-node Kubernetes cluster on this machine for the tests that
# run Kiln in real pods: etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler (the control-plane binary), containerd + runc with the CNI
# bridge plugin, kubelet and kube-proxy. Everything it writes lives in
# STATE_DIR, except what a node cannot avoid changing on the host (a bridge,
# iptables chains, a few sysctls, mounts), which down.sh undoes.
#
# Usage: up.sh STATE_DIR KCP IMAGE_TAR...
#   KCP        the multi-call binary from tests/controlplane/build.sh
#   IMAGE_TAR  docker-archive images to import (from build-images.sh)
# Prints nothing on success; the admin kubeconfig is STATE_DIR/admin.kubeconfig.
# The caller waits for the node to be Ready and installs cluster DNS.
set -euo pipefail
state=${1:?state directory}; kcp=${2:?control-plane binary}; shift 2
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/node.env"
mkdir -p "$state"/{pki,logs,cni/net.d,containerd,kubelet,pod-logs}
state=$(cd "$state" && pwd)

# One node per machine: containerd 1.6 and the CNI plugins use fixed paths
# under /run. A node left behind by a killed run is torn down first.
if [ -f "$NODE_MARKER" ]; then
  previous=$(cat "$NODE_MARKER")
  echo "tearing down the node left by an earlier run ($previous)" >&2
  bash "$here/down.sh" "$previous" "$kcp" >&2 || true
fi
echo "$state" > "$NODE_MARKER"

start() { # start NAME COMMAND...: a background process with its PID recorded
  local name=$1; shift
  setsid "$@" > "$state/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$state/$name.pid"
}

# --- host settings this node changes, saved for down.sh
sysctl -n net.ipv4.ip_forward vm.overcommit_memory kernel.panic kernel.panic_on_oops \
  | paste -d' ' <(printf '%s\n' net.ipv4.ip_forward vm.overcommit_memory kernel.panic kernel.panic_on_oops) - \
  > "$state/sysctl-before"

# --- network: a bridge holding the node address; pods are forwarded to each
# other and to Services, never to or from any other interface.
ip link add "$NODE_BRIDGE" type bridge
ip addr add "$NODE_IP/24" dev "$NODE_BRIDGE"
ip link set "$NODE_BRIDGE" up
iptables -I FORWARD 1 -i "$NODE_BRIDGE" ! -o "$NODE_BRIDGE" -m comment --comment kiln-node-no-egress -j DROP
iptables -I FORWARD 1 ! -i "$NODE_BRIDGE" -o "$NODE_BRIDGE" -m comment --comment kiln-node-no-ingress -j DROP
sysctl -qw net.ipv4.ip_forward=1

# --- PKI: one CA; the API server's serving certificate (node address, the
# kubernetes Service address and names); the API server's client certificate
# for the kubelet; the ServiceAccount signing key; static tokens per identity.
cd "$state/pki"
quiet() { "$@" > /dev/null 2>&1; }
quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=kiln-node-ca
signed() { # signed NAME SUBJECT EXTENSIONS
  quiet openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2"
  printf '%s\n' "$3" > "$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 2 -extfile "$1.ext"
}
signed apiserver /CN=kube-apiserver "$(printf 'subjectAltName=IP:%s,IP:127.0.0.1,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth' "$NODE_IP")"
signed kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
quiet openssl genrsa -out sa.key 2048
quiet openssl rsa -in sa.key -pubout -out sa.pub
token() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
admin=$(token); kubelet=$(token); proxy=$(token)
{
  echo "$admin,kiln-admin,kiln-admin,system:masters"
  echo "$kubelet,system:node:$NODE_NAME,system:node:$NODE_NAME,system:nodes"
  echo "$proxy,system:kube-proxy,system:kube-proxy"
} > tokens.csv
kubeconfig() { # kubeconfig NAME TOKEN
  cat > "$state/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: node
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: "$state/pki/ca.crt"}
users:
- name: user
  user: {token: "$2"}
contexts:
- name: node
  context: {cluster: node, user: user}
current-context: node
EOF
}
kubeconfig admin "$admin"; kubeconfig kubelet "$kubelet"; kubeconfig proxy "$proxy"
cd "$state"

# --- containerd: CRI with cgroupfs and overlayfs. restrict_oom_score_adj
# because this kind of VM lacks CAP_SYS_RESOURCE: without it runc fails to
# start every pod sandbox.
cat > containerd/config.toml <<EOF
version = 2
root = "$state/containerd/root"
state = "$state/containerd/state"
[grpc]
  address = "$state/containerd/containerd.sock"
[ttrpc]
  address = "$state/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni/net.d"
EOF
cat > cni/net.d/10-kiln.conflist <<EOF
{"cniVersion": "0.4.0", "name": "kiln-node", "plugins": [
  {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
            "routes": [{"dst": "$SERVICE_CIDR"}], "dataDir": "$state/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
start containerd containerd --config containerd/config.toml
for _ in $(seq 100); do [ -S containerd/containerd.sock ] && break; sleep 0.1; done
for image in "$@"; do
  ctr --address containerd/containerd.sock -n k8s.io images import "$image" > /dev/null
done

# --- control plane, reached by pods through the kubernetes Service
start etcd "$kcp" etcd --name=node --data-dir="$state/etcd" \
  --listen-client-urls=http://127.0.0.1:$ETCD_PORT --advertise-client-urls=http://127.0.0.1:$ETCD_PORT \
  --listen-peer-urls=http://127.0.0.1:$ETCD_PEER_PORT --initial-advertise-peer-urls=http://127.0.0.1:$ETCD_PEER_PORT \
  --initial-cluster=node=http://127.0.0.1:$ETCD_PEER_PORT --unsafe-no-fsync --log-level=warn
start apiserver "$kcp" kube-apiserver --etcd-servers=http://127.0.0.1:$ETCD_PORT \
  --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port=6443 \
  --cert-dir="$state/apiserver-certs" --tls-cert-file=pki/apiserver.crt --tls-private-key-file=pki/apiserver.key \
  --client-ca-file=pki/ca.crt --token-auth-file=pki/tokens.csv \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --service-account-key-file=pki/sa.pub --service-account-signing-key-file=pki/sa.key \
  --service-account-issuer=https://kubernetes.default.svc --allow-privileged=true \
  --kubelet-client-certificate=pki/kubelet-client.crt --kubelet-client-key=pki/kubelet-client.key \
  --kubelet-preferred-address-types=InternalIP --v=1
ready=""
for _ in $(seq 240); do
  if curl -sf --cacert pki/ca.crt -H "Authorization: Bearer $admin" "https://$NODE_IP:6443/readyz" > /dev/null 2>&1; then
    ready=yes; break
  fi
  sleep 0.5
done
[ -n "$ready" ] || { echo "the API server did not become ready; see $state/logs/apiserver.log" >&2; exit 1; }
start controller-manager "$kcp" kube-controller-manager --kubeconfig=admin.kubeconfig --leader-elect=false \
  --secure-port=0 --service-account-private-key-file=pki/sa.key --root-ca-file=pki/ca.crt \
  --concurrent-gc-syncs=5 --v=1
start scheduler "$kcp" kube-scheduler --kubeconfig=admin.kubeconfig --leader-elect=false --secure-port=0 --v=1

# --- kubelet: cgroupfs like containerd, cluster DNS at the kube-dns Service
# address, eviction thresholds low enough for a shared test machine.
printf 'nameserver 127.0.0.1\n' > resolv.conf
cat > kubelet-config.yaml <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$state/containerd/containerd.sock
failSwapOn: false
address: $NODE_IP
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $state/pki/ca.crt}}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: $state/resolv.conf
podLogsDir: $state/pod-logs
serializeImagePulls: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
EOF
start kubelet "$kcp" kubelet --config=kubelet-config.yaml --kubeconfig=kubelet.kubeconfig \
  --root-dir="$state/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1

# --- kube-proxy in iptables mode, leaving the host's conntrack sysctls alone
cat > kube-proxy-config.yaml <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $state/proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
EOF
start kube-proxy "$kcp" kube-proxy --config=kube-proxy-config.yaml --v=1
