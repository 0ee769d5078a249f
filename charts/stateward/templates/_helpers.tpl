{{- define "stateward.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stateward.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "stateward.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stateward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "stateward.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* The agent's image: agent.image, else the manager's own. Pin it by digest
(repository@sha256:...) and the manager policy admits agent Jobs of exactly that. */ -}}
{{- define "stateward.agentImage" -}}
{{- .Values.agent.image | default (printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion)) -}}
{{- end -}}

{{- define "stateward.managerUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "stateward.serviceAccountName" . }}
{{- end -}}

{{- /* The namespaces the manager watches, comma-separated; empty = all. */ -}}
{{- define "stateward.watchNamespaces" -}}
{{- if and .Values.namespaced .Values.watchNamespaces -}}
{{- fail "set namespaced or watchNamespaces, not both (namespaced is watchNamespaces: [<release namespace>])" -}}
{{- end -}}
{{- if .Values.namespaced -}}
{{- .Release.Namespace -}}
{{- else -}}
{{- join "," .Values.watchNamespaces -}}
{{- end -}}
{{- end -}}

{{- /* The features turned off, as the manager's --disable list. */ -}}
{{- define "stateward.disabledFeatures" -}}
{{- $off := list -}}
{{- if not .Values.features.monitoringObjects }}{{ $off = append $off "monitoring-objects" }}{{ end -}}
{{- if not .Values.features.cloneStatefulSets }}{{ $off = append $off "clone-statefulsets" }}{{ end -}}
{{- if not .Values.features.volumeExpansion }}{{ $off = append $off "volume-expansion" }}{{ end -}}
{{- join "," $off -}}
{{- end -}}
