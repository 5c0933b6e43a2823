{{/* Names, labels and small lookups shared by the templates. */}}

{{- define "nanorun.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-nanorun, or the release name alone when it already contains the chart name. */}}
{{- define "nanorun.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nanorun.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nanorun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nanorun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "nanorun.labels" -}}
helm.sh/chart: {{ include "nanorun.chart" . }}
{{ include "nanorun.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nanorun
{{- end }}

{{- define "nanorun.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nanorun.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nanorun.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "true" when operator.policy restricts anything (else empty: everything allowed). */}}
{{- define "nanorun.policy" -}}
{{- $p := .Values.operator.policy }}
{{- if or $p.storage.prefixes $p.storage.namespaces $p.storage.readOnlyPrefixes $p.images $p.priorityClasses $p.trainingRuntimes $p.nodeLabels $p.tolerations }}true{{ end }}
{{- end }}

{{/* A list of URI prefixes as the policy ConfigMap's value: one per line, no trailing slash. */}}
{{- define "nanorun.prefixLines" -}}
{{- $lines := list }}
{{- range . }}{{ $lines = append $lines (trim . | trimSuffix "/") }}{{ end }}
{{- join "\n" $lines | toJson }}
{{- end }}

{{/* A list as the policy ConfigMap's value: one entry per line. */}}
{{- define "nanorun.lines" -}}
{{- $lines := list }}
{{- range . }}{{ $lines = append $lines (trim .) }}{{ end }}
{{- join "\n" $lines | toJson }}
{{- end }}
