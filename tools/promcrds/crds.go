// Package promcrds pins the Prometheus Operator's API types, from which `cargo xtask
// tools` generates the upstream CRD manifests (PodMonitor, ServiceMonitor, PrometheusRule)
// with controller-gen, as upstream does; the monitoring tests install them into the
// local cluster so the objects Stateward creates are validated by the real schemas.
package promcrds

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
