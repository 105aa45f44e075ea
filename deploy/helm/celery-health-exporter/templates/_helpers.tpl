{{/* Chart name, truncated to 63 characters. */}}
{{- define "che.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "che.fullname" -}}
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

{{- define "che.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object; the ServiceMonitor selects on che.selectorLabels. */}}
{{- define "che.labels" -}}
helm.sh/chart: {{ include "che.chart" . }}
{{ include "che.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "che.selectorLabels" -}}
app.kubernetes.io/name: {{ include "che.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "che.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "che.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "che.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret that holds the broker URL, existing or chart-made. */}}
{{- define "che.brokerSecretName" -}}
{{- if .Values.broker.existingSecret }}
{{- .Values.broker.existingSecret }}
{{- else }}
{{- printf "%s-broker" (include "che.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "che.brokerEnv" -}}
- name: CELERY_EXPORTER_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "che.brokerSecretName" . }}
      key: {{ .Values.broker.existingSecretKey }}
{{- end }}
