#!/usr/bin/env bash
# Tears down the node up.sh started and restores what it changed on the host.
# Usage: down.sh STATE_DIR KCP. Safe to run twice, and on a half-started node.
set -uo pipefail
state=${1:?state directory}; kcp=${2:?control-plane binary}
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/node.env"
export KUBECONFIG="$state/admin.kubeconfig"
pid_of() { [ -f "$state/$1.pid" ] && cat "$state/$1.pid"; }
alive() { local pid; pid=$(pid_of "$1") && kill -0 "$pid" 2>/dev/null; }
stop() { # stop NAME...: SIGTERM, up to 10 s, then SIGKILL
  local name pid
  for name in "$@"; do pid=$(pid_of "$name") && kill "$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    local running=""
    for name in "$@"; do alive "$name" && running=yes; done
    [ -z "$running" ] && return
    sleep 0.2
  done
  for name in "$@"; do pid=$(pid_of "$name") && kill -9 "$pid" 2>/dev/null; done
}
ctr_() { ctr --address "$state/containerd/containerd.sock" -n k8s.io "$@"; }

# 1. While the kubelet still runs, it stops every pod: CNI teardown, network
# namespaces, volume unmounts. Nothing may create or schedule new pods
# meanwhile, so the controllers stop first; then pods are deleted by force.
stop controller-manager scheduler
if alive kubelet && alive apiserver; then
  token=$(sed -n 's/^\([^,]*\),kiln-admin,.*/\1/p' "$state/pki/tokens.csv")
  api() { curl -s --cacert "$state/pki/ca.crt" -H "Authorization: Bearer $token" "$@"; }
  for ns in $(api "https://$NODE_IP:6443/api/v1/pods" | grep -o '"namespace": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/' | sort -u); do
    api -X DELETE "https://$NODE_IP:6443/api/v1/namespaces/$ns/pods?gracePeriodSeconds=0" > /dev/null
  done
  for _ in $(seq 60); do
    [ -z "$(ctr_ tasks ls -q 2>/dev/null)" ] && break
    sleep 1
  done
fi

# 2. Processes, dependents first.
stop kube-proxy kubelet controller-manager scheduler
stop apiserver
stop etcd
# Containers the kubelet could not stop: kill their shims with containerd.
for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$task" 2>/dev/null; done
stop containerd
pkill -9 -f "containerd-shim-runc-v2 .*-address $state/" 2>/dev/null

# 3. iptables: kube-proxy's chains, the kubelet's leftovers, our FORWARD rules.
"$kcp" kube-proxy --cleanup > /dev/null 2>&1
for ipt in iptables ip6tables; do
  $ipt -D INPUT -j KUBE-FIREWALL 2>/dev/null
  $ipt -D OUTPUT -j KUBE-FIREWALL 2>/dev/null
  for table in filter nat mangle; do
    chains=$($ipt -t $table -S 2>/dev/null | awk '/^-N KUBE-/{print $2}')
    for chain in $chains; do $ipt -t $table -F "$chain" 2>/dev/null; done
    for chain in $chains; do $ipt -t $table -X "$chain" 2>/dev/null; done
  done
done
iptables -D FORWARD -i "$NODE_BRIDGE" ! -o "$NODE_BRIDGE" -m comment --comment kiln-node-no-egress -j DROP 2>/dev/null
iptables -D FORWARD ! -i "$NODE_BRIDGE" -o "$NODE_BRIDGE" -m comment --comment kiln-node-no-ingress -j DROP 2>/dev/null

# 4. Mounts (the kubelet bind-mounts its root dir; pods' volumes and network
# namespaces), the bridge, containerd's fixed /run directories.
grep -E " ($state|/run/netns/cni-)" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
rm -f /run/netns/cni-* 2>/dev/null
ip link del "$NODE_BRIDGE" 2>/dev/null
rm -rf /run/containerd/runc/k8s.io /run/containerd/s 2>/dev/null
rmdir /run/containerd/runc /run/containerd 2>/dev/null

# 5. Sysctls as they were before the node (the kubelet changes some too).
if [ -f "$state/sysctl-before" ]; then
  while read -r key value; do sysctl -qw "$key=$value"; done < "$state/sysctl-before"
fi
[ "$(cat "$NODE_MARKER" 2>/dev/null)" = "$state" ] && rm -f "$NODE_MARKER"
exit 0
