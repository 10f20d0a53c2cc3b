# azd postdeploy hook (PowerShell 7): subscribe the deployed functions to Event Grid.
#
# Same steps as post-deploy.sh: wait for the host's blobs_extension and eventgrid_extension system keys, then
# deploy infra/event-subscriptions.bicep with them. The keys go to az through a private temporary parameters
# file: never on a command line, never printed. Safe to re-run.
$ErrorActionPreference = 'Stop'
Set-Location (Join-Path $PSScriptRoot '..')

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Write-Error 'The Azure CLI (az) is not available; see README.md#prerequisites.'
    exit 1
}

# azd passes its environment's values to hooks; when run by hand, load them from azd.
if (-not $env:AZURE_FUNCTION_NAME -and (Get-Command azd -ErrorAction SilentlyContinue)) {
    Write-Host "Loading the azd environment's values..."
    foreach ($line in (& azd env get-values)) {
        if ($line -match '^([^=]+)=(.*)$') {
            [Environment]::SetEnvironmentVariable($Matches[1], ($Matches[2] -replace '^"|"$'))
        }
    }
}

$required = @('AZURE_FUNCTION_NAME', 'RESOURCE_GROUP', 'AZURE_STORAGE_ACCOUNT_NAME', 'STORAGE_SYSTEM_TOPIC_NAME',
    'DEAD_LETTER_CONTAINER_NAME', 'TRAINING_CONTAINER_NAME', 'AZUREML_RESOURCE_GROUP', 'AZUREML_SYSTEM_TOPIC_NAME')
$missing = @($required | Where-Object { -not [Environment]::GetEnvironmentVariable($_) })
if ($missing.Count -gt 0) {
    Write-Error "Missing azd environment values: $($missing -join ' ') (run 'azd provision' first)."
    exit 1
}

function Get-SystemKey([string] $Name) {
    $value = az functionapp keys list --name $env:AZURE_FUNCTION_NAME --resource-group $env:RESOURCE_GROUP `
        --query "systemKeys.$Name" --output tsv 2>$null
    if ($LASTEXITCODE -ne 0) { return '' }
    return "$value".Trim()
}

$attempts = if ($env:TUNEGRID_KEY_WAIT_ATTEMPTS) { [int] $env:TUNEGRID_KEY_WAIT_ATTEMPTS } else { 30 }
$pause = if ($env:TUNEGRID_KEY_WAIT_SECONDS) { [int] $env:TUNEGRID_KEY_WAIT_SECONDS } else { 10 }
for ($attempt = 1; ; $attempt++) {
    $blobsKey = Get-SystemKey 'blobs_extension'
    $eventGridKey = Get-SystemKey 'eventgrid_extension'
    if ($blobsKey -and $eventGridKey) { break }
    if ($attempt -ge $attempts) {
        Write-Error ("The Functions host of $env:AZURE_FUNCTION_NAME has no blobs_extension/eventgrid_extension key " +
            "after $attempts tries. Check that the deployment indexed ingest_dataset and job_events " +
            '(az functionapp function list), then run this script again.')
        exit 1
    }
    Write-Host "Waiting for the Functions host to create its extension keys (try $attempt of $attempts)..."
    Start-Sleep -Seconds $pause
}

$parameters = @{
    contentVersion = '1.0.0.0'
    parameters     = @{
        functionAppName          = @{ value = $env:AZURE_FUNCTION_NAME }
        storageAccountName       = @{ value = $env:AZURE_STORAGE_ACCOUNT_NAME }
        storageSystemTopicName   = @{ value = $env:STORAGE_SYSTEM_TOPIC_NAME }
        trainingContainerName    = @{ value = $env:TRAINING_CONTAINER_NAME }
        deadLetterContainerName  = @{ value = $env:DEAD_LETTER_CONTAINER_NAME }
        mlWorkspaceResourceGroup = @{ value = $env:AZUREML_RESOURCE_GROUP }
        mlSystemTopicName        = @{ value = $env:AZUREML_SYSTEM_TOPIC_NAME }
        blobsExtensionKey        = @{ value = $blobsKey }
        eventGridExtensionKey    = @{ value = $eventGridKey }
    }
}

$paramsFile = [System.IO.Path]::GetTempFileName()
try {
    if (-not $IsWindows) { chmod 600 $paramsFile }
    $parameters | ConvertTo-Json -Depth 5 | Set-Content -Path $paramsFile -Encoding utf8
    Write-Host 'Creating the Event Grid subscriptions (BlobCreated -> ingest_dataset, job events -> job_events)...'
    az deployment group create `
        --resource-group $env:RESOURCE_GROUP `
        --name 'tunegrid-event-subscriptions' `
        --template-file 'infra/event-subscriptions.bicep' `
        --parameters "@$paramsFile" `
        --output none
    if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
}
finally {
    Remove-Item -Path $paramsFile -Force -ErrorAction SilentlyContinue
}

Write-Host 'Event Grid subscriptions are in place.'
