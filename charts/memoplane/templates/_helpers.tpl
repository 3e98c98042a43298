{{/* Names, labels and shared snippets of the memoplane chart. */}}

{{- define "memoplane.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "memoplane.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "memoplane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "memoplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: memoplane
{{- end -}}

{{/* selectorLabels: call with (dict "root" $ "component" "operator") */}}
{{- define "memoplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "memoplane.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "memoplane.componentLabels" -}}
{{ include "memoplane.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "memoplane.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "memoplane.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{ default (printf "%s-operator" (include "memoplane.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.operator.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{- define "memoplane.agentServiceAccount" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{ default (printf "%s-agent" (include "memoplane.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.agent.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{- define "memoplane.minioFullname" -}}
{{- printf "%s-minio" (include "memoplane.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding accessKey/secretKey for the object store. */}}
{{- define "memoplane.s3SecretName" -}}
{{- if .Values.objectStore.minio.enabled -}}
{{ default (printf "%s-credentials" (include "memoplane.minioFullname" .)) .Values.objectStore.minio.existingSecret }}
{{- else -}}
{{ default (printf "%s-s3-credentials" (include "memoplane.fullname" .)) .Values.objectStore.external.existingSecret }}
{{- end -}}
{{- end -}}

{{- define "memoplane.s3Endpoint" -}}
{{- if .Values.objectStore.minio.enabled -}}
http://{{ include "memoplane.minioFullname" . }}.{{ .Release.Namespace }}.svc:9000
{{- else -}}
{{ required "objectStore.external.endpoint is required when objectStore.minio.enabled is false" .Values.objectStore.external.endpoint }}
{{- end -}}
{{- end -}}

{{/* The Secret holding the operator's Ed25519 private key (signingkey.yaml). */}}
{{- define "memoplane.signingSecretName" -}}
{{ printf "%s-signing-key" (include "memoplane.fullname" .) }}
{{- end -}}

{{/* That key's id: a name and an epoch (memoplane.trust.keys.KEYID_PATTERN). "agents": the agents
shared it before each had a key of its own; the id stays, so what it signed stays trusted. */}}
{{- define "memoplane.signingKeyId" -}}
{{ printf "%s-agents-1" .Release.Name }}
{{- end -}}

{{/* The signing key as a file readable by its owner (and the pod's fsGroup) only: the
operator's (agents have keys of their own). The volume is "signing-key" (memoplane.signingKeyVolume). */}}
{{- define "memoplane.signingKeyEnv" -}}
- name: MEMOPLANE_SIGNING_KEY_FILE
  value: /var/run/secrets/memoplane/signing/private.pem
- name: MEMOPLANE_SIGNING_KEYID
  value: {{ include "memoplane.signingKeyId" . | quote }}
{{- end -}}

{{- define "memoplane.signingKeyMount" -}}
- name: signing-key
  mountPath: /var/run/secrets/memoplane/signing
  readOnly: true
{{- end -}}

{{- define "memoplane.signingKeyVolume" -}}
- name: signing-key
  secret:
    secretName: {{ include "memoplane.signingSecretName" . }}
    defaultMode: 0400
    items:
      - {key: private.pem, path: private.pem}
{{- end -}}

{{/* Environment shared by the operator and the agents (the store keys are not: see s3KeysEnv). */}}
{{- define "memoplane.commonEnv" -}}
- name: MEMOPLANE_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: MEMOPLANE_WATCH_NAMESPACES
  value: {{ .Values.watchNamespaces | quote }}
- name: MEMOPLANE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: MEMOPLANE_S3_ENDPOINT
  value: {{ include "memoplane.s3Endpoint" . | quote }}
- name: MEMOPLANE_OPENLINEAGE_URL
  value: {{ .Values.openlineage.url | quote }}
{{- include "memoplane.apiServerEnv" . }}
{{- end -}}

{{/* apiServer: where in-cluster clients reach the API server when the Service does not route. */}}
{{- define "memoplane.apiServerEnv" -}}
{{- with .Values.apiServer }}
{{- if or .host .port }}
{{- if not (and .host .port) }}
{{- fail "apiServer.host and apiServer.port are set together (the API server's address for pods), or neither" }}
{{- end }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .port | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* hostNetwork: pods in the node's network (values: hostNetwork); DNS still through the cluster's. */}}
{{- define "memoplane.hostNetwork" -}}
{{- if .Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- end -}}

{{/* The store keys as variables: the operator only. The agents, whose environment a job
might read through /proc, get them as files (agent.yaml, MEMOPLANE_S3_CREDENTIALS_DIR). */}}
{{- define "memoplane.s3KeysEnv" -}}
- name: MEMOPLANE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "memoplane.s3SecretName" . }}
      key: accessKey
- name: MEMOPLANE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "memoplane.s3SecretName" . }}
      key: secretKey
{{- end -}}

{{/* Namespace .ns's home prefix (memoplane.cluster.protocol.default_store_prefix): <homePrefix>/<ns>/. */}}
{{- define "memoplane.home" -}}
{{- with trimAll "/" .root.Values.objectStore.homePrefix }}{{ . }}/{{ end }}{{ .ns }}/
{{- end }}

{{/* MEMOPLANE_HOME: where namespaces' homes are (the operator's default caches, GMemSeed overlays). */}}
{{- define "memoplane.homeUrl" -}}
s3://{{ .Values.objectStore.bucket }}{{ with trimAll "/" .Values.objectStore.homePrefix }}/{{ . }}{{ end }}
{{- end }}

{{- define "memoplane.apiServiceAccount" -}}
{{- if .Values.api.serviceAccount.create -}}
{{ default (printf "%s-api" (include "memoplane.fullname" .)) .Values.api.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.api.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{/* The secret the API and the agents share for the agents' session endpoint (sessions.yaml). */}}
{{- define "memoplane.sessionSecretName" -}}
{{ printf "%s-api-sessions" (include "memoplane.fullname" .) }}
{{- end -}}

{{- define "memoplane.sessionSecretPath" -}}
/var/run/secrets/memoplane/sessions/secret
{{- end -}}

{{/* Where the API keeps /v1/run results and its audit log: under the home prefix, beside the
namespaces' homes (no namespace can be named `_api`). */}}
{{- define "memoplane.apiStore" -}}
s3://{{ .Values.objectStore.bucket }}/{{ with trimAll "/" .Values.objectStore.homePrefix }}{{ . }}/{{ end }}_api
{{- end -}}
