// Command kcp is a multi-call binary holding the Kubernetes control plane
// Kiln's tests run against: etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler, plus the node components kubelet and kube-proxy for the
// tests that run Kiln in real pods, built from Go modules so no release
// download is needed.
// The component is chosen by the first argument (or by argv[0] when invoked
// through a symlink of that name).
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // CronJob time zones must work without a system zoneinfo

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	component := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if component == "kcp" {
		if len(args) == 0 {
			fmt.Fprintln(os.Stderr, "usage: kcp etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy [flags]")
			os.Exit(2)
		}
		component, args = args[0], args[1:]
	}
	// Each component parses os.Args itself; present it as if invoked directly.
	os.Args = append([]string{component}, args...)
	switch component {
	case "etcd":
		etcdmain.Main(os.Args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubelet":
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "kube-proxy":
		os.Exit(cli.Run(proxy.NewProxyCommand()))
	default:
		fmt.Fprintf(os.Stderr, "kcp: unknown component %q\n", component)
		os.Exit(2)
	}
}
