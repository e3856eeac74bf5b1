{{/* Chart name. */}}
{{- define "genai-task-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; leaves room for the "-rN" suffix of HA copies and the pod ordinal. */}}
{{- define "genai-task-exporter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "genai-task-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genai-task-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genai-task-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "genai-task-exporter.labels" -}}
helm.sh/chart: {{ include "genai-task-exporter.chart" . }}
{{ include "genai-task-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: exporter
{{- end }}

{{/* Name of the Secret whose keys become environment variables; empty when there is none. */}}
{{- define "genai-task-exporter.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if .Values.secret.create }}
{{- include "genai-task-exporter.fullname" . }}
{{- end }}
{{- end }}

{{- define "genai-task-exporter.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The port the exporter listens on, from config.server.listen_address (default 9850). */}}
{{- define "genai-task-exporter.containerPort" -}}
{{- $addr := "" }}
{{- with .Values.config.server }}{{ $addr = .listen_address | default "" }}{{ end }}
{{- $port := regexFind "[0-9]+$" (toString $addr) }}
{{- default "9850" $port }}
{{- end }}
