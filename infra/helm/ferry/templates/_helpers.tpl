{{/* The name every object of the release is prefixed with. */}}
{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The workloads' image. Ferry publishes none, so there is no default repository to fall back on. */}}
{{- define "ferry.image" -}}
{{- $repository := required "image.repository is required: build the image with infra/helm/ferry/Dockerfile (see the chart's README.md), push it, and set image.repository to its name" .Values.image.repository -}}
{{ $repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The NATS settings both workloads share: ferryd and the operator read $FERRY_NATS and $FERRY_SITE. */}}
{{- define "ferry.natsEnv" -}}
- name: FERRY_NATS
{{- if .Values.nats.urlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.nats.urlSecret.name }}
      key: {{ .Values.nats.urlSecret.key }}
{{- else }}
  value: {{ .Values.nats.url | quote }}
{{- end }}
- name: FERRY_SITE
  value: {{ .Values.site.name | quote }}
{{- end -}}
