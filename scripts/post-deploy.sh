#!/bin/sh
# azd postdeploy hook (POSIX sh): subscribe the deployed functions to Event Grid.
#
# The blob trigger (Event Grid source) and the Event Grid trigger are reached through the host's extension
# webhooks, which need the system keys blobs_extension and eventgrid_extension. Those exist only once the
# host has started with the deployed code, so this runs after `azd deploy`, as in the Azure-Samples
# functions-quickstart-*-azd-eventgrid-blob templates. It deploys infra/event-subscriptions.bicep (the
# filters, retry policy and dead-lettering live there, shared with post-deploy.ps1). Safe to re-run.
# The keys go to az through a private temporary parameters file: never on a command line, never printed.
set -eu

cd "$(dirname "$0")/.."

if ! command -v az >/dev/null 2>&1; then
    echo "Error: the Azure CLI (az) is not available; see README.md#prerequisites." >&2
    exit 1
fi

# azd passes its environment's values to hooks; when run by hand, load them from azd.
if [ -z "${AZURE_FUNCTION_NAME:-}" ] && command -v azd >/dev/null 2>&1; then
    echo "Loading the azd environment's values..."
    azd_values=$(azd env get-values)
    while IFS='=' read -r key value; do
        [ -n "$key" ] || continue
        value=${value#\"}
        value=${value%\"}
        export "$key=$value"
    done <<EOF
$azd_values
EOF
fi

missing=""
for name in AZURE_FUNCTION_NAME RESOURCE_GROUP AZURE_STORAGE_ACCOUNT_NAME STORAGE_SYSTEM_TOPIC_NAME \
    DEAD_LETTER_CONTAINER_NAME TRAINING_CONTAINER_NAME AZUREML_RESOURCE_GROUP AZUREML_SYSTEM_TOPIC_NAME; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "Error: missing azd environment values:$missing (run 'azd provision' first)." >&2
    exit 1
fi

system_key() {
    az functionapp keys list --name "$AZURE_FUNCTION_NAME" --resource-group "$RESOURCE_GROUP" \
        --query "systemKeys.$1" --output tsv 2>/dev/null || true
}

attempts=${TUNEGRID_KEY_WAIT_ATTEMPTS:-30}
pause=${TUNEGRID_KEY_WAIT_SECONDS:-10}
blobs_key=""
eventgrid_key=""
attempt=1
while :; do
    blobs_key=$(system_key blobs_extension)
    eventgrid_key=$(system_key eventgrid_extension)
    if [ -n "$blobs_key" ] && [ -n "$eventgrid_key" ]; then
        break
    fi
    if [ "$attempt" -ge "$attempts" ]; then
        echo "Error: the Functions host of $AZURE_FUNCTION_NAME has no blobs_extension/eventgrid_extension key" \
            "after $attempts tries. Check that the deployment indexed ingest_dataset and job_events" \
            "(az functionapp function list), then run this script again." >&2
        exit 1
    fi
    echo "Waiting for the Functions host to create its extension keys (try $attempt of $attempts)..."
    attempt=$((attempt + 1))
    sleep "$pause"
done

umask 077
params_file=$(mktemp "${TMPDIR:-/tmp}/tunegrid-eventgrid.XXXXXX")
trap 'rm -f "$params_file"' EXIT
trap 'exit 1' INT TERM
cat >"$params_file" <<EOF
{
  "contentVersion": "1.0.0.0",
  "parameters": {
    "functionAppName": {"value": "$AZURE_FUNCTION_NAME"},
    "storageAccountName": {"value": "$AZURE_STORAGE_ACCOUNT_NAME"},
    "storageSystemTopicName": {"value": "$STORAGE_SYSTEM_TOPIC_NAME"},
    "trainingContainerName": {"value": "$TRAINING_CONTAINER_NAME"},
    "deadLetterContainerName": {"value": "$DEAD_LETTER_CONTAINER_NAME"},
    "mlWorkspaceResourceGroup": {"value": "$AZUREML_RESOURCE_GROUP"},
    "mlSystemTopicName": {"value": "$AZUREML_SYSTEM_TOPIC_NAME"},
    "blobsExtensionKey": {"value": "$blobs_key"},
    "eventGridExtensionKey": {"value": "$eventgrid_key"}
  }
}
EOF

echo "Creating the Event Grid subscriptions (BlobCreated -> ingest_dataset, job events -> job_events)..."
az deployment group create \
    --resource-group "$RESOURCE_GROUP" \
    --name "tunegrid-event-subscriptions" \
    --template-file "infra/event-subscriptions.bicep" \
    --parameters "@$params_file" \
    --output none

echo "Event Grid subscriptions are in place."
