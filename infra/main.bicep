// Tunegrid on Azure: a Flex Consumption Function App with a user-assigned identity, its storage, Key Vault,
// Application Insights, its run-events topic, and the roles and Event Grid system topics it needs on an existing
// Azure ML workspace.
// Follows Azure-Samples/functions-quickstart-python-azd-eventgrid-blob (same AVM modules and versions).
// The Event Grid subscriptions need the host's extension keys, so scripts/post-deploy.* creates them
// (infra/event-subscriptions.bicep) once the code is deployed.
targetScope = 'subscription'

// ---------------------------------------------------------------- azd environment

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; used to derive a unique token for every resource name.')
param environmentName string

@minLength(1)
@description('Region of the new resources (pick one where Flex Consumption is available).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the deploying user or service principal. It gets the data roles to upload datasets, read the ledger and the proxy key, and AzureML Data Scientist on the workspace. Empty: no roles for the deployer.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
@description('Kind of principal that principalId is.')
param principalType string = 'User'

@description('Name of the resource group to create; empty = rg-<environmentName>.')
param resourceGroupName string = ''

@description('Name of the Function App; empty = derived from the environment.')
param functionAppName string = ''

@description('Name of the data storage account; empty = derived from the environment.')
param storageAccountName string = ''

@description('Name of the Key Vault; empty = derived from the environment. A deleted vault keeps its name for 7 days (purge protection), so a new name lets a torn-down environment be provisioned again sooner.')
param keyVaultName string = ''

@allowed([
  512
  2048
  4096
])
@description('Memory of one Flex Consumption instance (MB). azure-ai-ml needs more than 512.')
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
@description('Upper bound of Flex Consumption instances.')
param maximumInstanceCount int = 100

// ---------------------------------------------------------------- Azure ML

@minLength(1)
@description('Name of the existing Azure ML workspace the app fine-tunes and deploys in (app setting AZUREML_WORKSPACE_NAME).')
param mlWorkspaceName string

@minLength(1)
@description('Resource group of that workspace, in this subscription (app setting AZURE_RESOURCE_GROUP).')
param mlWorkspaceResourceGroup string

@minLength(1)
@description('Registry holding the base model and the chat_completion_pipeline component. azureml is Microsoft\'s public registry.')
param mlRegistryName string = 'azureml'

@description('Grant the app AzureML Registry User on mlRegistryName. Leave false for the public azureml registry (reading it needs no role); set true for a private registry.')
param assignRegistryRole bool = false

@description('Resource group of a private registry (used only when assignRegistryRole is true); empty = the workspace\'s resource group.')
param mlRegistryResourceGroup string = ''

@description('Name of the Event Grid system topic of the workspace. Azure allows one system topic per source: if the workspace already has one, give its name here; empty = a name derived from the workspace.')
param mlSystemTopicName string = ''

@minLength(1)
@description('Compute for the four pipeline steps: the name of an existing cluster, or serverless (app setting AZUREML_COMPUTE). The app\'s role cannot create clusters.')
param mlCompute string = 'serverless'

@minLength(1)
@description('Serverless instance type of the model-import step (AZUREML_INSTANCE_TYPE_MODEL_IMPORT).')
param instanceTypeModelImport string = 'Standard_d12_v2'

@minLength(1)
@description('Serverless instance type of the preprocess step (AZUREML_INSTANCE_TYPE_PREPROCESS).')
param instanceTypePreprocess string = 'Standard_d12_v2'

@description('Serverless instance type of the fine-tune step; empty = the base model\'s first recommended fine-tune SKU (AZUREML_INSTANCE_TYPE_FINETUNE).')
param instanceTypeFinetune string = ''

@description('Serverless instance type of the evaluation step; empty = the base model\'s first recommended fine-tune SKU (AZUREML_INSTANCE_TYPE_MODEL_EVALUATION).')
param instanceTypeModelEvaluation string = ''

@description('GPUs per fine-tune node for serverless compute; empty = read from the cluster\'s size (AZUREML_GPUS_PER_NODE).')
param gpusPerNode string = ''

@description('Azure ML datastore on the prepared-data container; empty = jobs get https blob URLs (AZUREML_DATASTORE).')
param mlDatastore string = ''

@description('Instance type of new online deployments; empty = the base model\'s first recommended inference SKU (INFERENCE_INSTANCE_TYPE).')
param inferenceInstanceType string = ''

@minLength(1)
@description('Value of the tunegrid-owner tag on everything this app creates; the janitor only touches resources carrying it (TUNEGRID_INSTANCE).')
param tunegridInstance string = 'tunegrid'

@secure()
@description('Comma-separated keys the scoring proxy accepts. Stored in Key Vault; azd generates one on the first provision and keeps it in the environment\'s config.')
@metadata({
  azd: {
    type: 'generate'
    config: {
      length: 40
      noSpecial: true
    }
  }
})
param proxyApiKeys string

// ---------------------------------------------------------------- names

// Conditionals stay on one line and start without `!` (`empty(x) ? derived : x`): pycep, the parser checkov reads
// Bicep with, rejects a multi-line one and reads `!a ? b : c` as `!(a ? b : c)` (docs/deploy.md).
var abbrs = loadJsonContent('./abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var appName = empty(functionAppName) ? '${abbrs.webSitesFunctions}api-${resourceToken}' : functionAppName
var deploymentStorageContainerName = 'app-package-${take(appName, 32)}-${take(toLower(uniqueString(appName, resourceToken)), 7)}'
var storageSystemTopicName = '${abbrs.eventGridSystemTopics}${abbrs.storageStorageAccounts}-${resourceToken}'
var runEventsTopicName = '${abbrs.eventGridTopics}runs-${resourceToken}'
// One system topic per workspace, shared by every Tunegrid deployment on it: the name depends on the workspace only.
var mlTopicToken = take(uniqueString(subscription().id, mlWorkspaceResourceGroup, mlWorkspaceName), 6)
var mlTopicDerivedName = '${abbrs.eventGridSystemTopics}${take(mlWorkspaceName, 30)}-${mlTopicToken}'
var mlTopicName = empty(mlSystemTopicName) ? mlTopicDerivedName : mlSystemTopicName

// shared/settings.py CONTAINERS and TABLES (tests/test_infra.py keeps these in step with the code).
var dataContainers = [
  'training-data'
  'validation-reports'
  'prepared-data'
  'run-reports'
]
var dataTables = [
  'tunegridruns'
  'tunegridaudit'
  'tunegridusage'
  'tunegridcosts'
]
var trainingContainerName = 'training-data'
// Where Event Grid puts events it could not deliver after its retries.
var deadLetterContainerName = 'eventgrid-deadletter'

// ---------------------------------------------------------------- resources

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: empty(resourceGroupName) ? '${abbrs.resourcesResourceGroups}${environmentName}' : resourceGroupName
  location: location
  tags: tags
}

// The app's identity: storage, Key Vault, Application Insights and Azure ML all see this one principal.
module apiIdentity 'br/public:avm/res/managed-identity/user-assigned-identity:0.4.1' = {
  name: 'apiUserAssignedIdentity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}api-${resourceToken}'
    location: location
    tags: tags
  }
}

module appServicePlan 'br/public:avm/res/web/serverfarm:0.1.1' = {
  name: 'appserviceplan'
  scope: rg
  params: {
    name: '${abbrs.webServerFarms}${resourceToken}'
    sku: {
      name: 'FC1'
      tier: 'FlexConsumption'
    }
    reserved: true
    location: location
    tags: tags
  }
}

// One account for the host (AzureWebJobsStorage), the deployment package and the app's data (DataStorage).
module storage 'br/public:avm/res/storage/storage-account:0.8.3' = {
  name: 'storage'
  scope: rg
  params: {
    name: empty(storageAccountName) ? '${abbrs.storageStorageAccounts}${resourceToken}' : storageAccountName
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false // identity only: no account keys, no SAS
    dnsEndpointType: 'Standard'
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    blobServices: {
      containers: [for name in concat([deploymentStorageContainerName, deadLetterContainerName], dataContainers): {
        name: name
        publicAccess: 'None'
      }]
    }
    tableServices: {
      tables: [for name in dataTables: {
        name: name
      }]
    }
    minimumTlsVersion: 'TLS1_2'
    location: location
    tags: tags
  }
}

module logAnalytics 'br/public:avm/res/operational-insights/workspace:0.11.1' = {
  name: '${uniqueString(deployment().name, location)}-loganalytics'
  scope: rg
  params: {
    name: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    location: location
    tags: tags
    dataRetention: 30
  }
}

module monitoring 'br/public:avm/res/insights/component:0.6.0' = {
  name: '${uniqueString(deployment().name, location)}-appinsights'
  scope: rg
  params: {
    name: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
    workspaceResourceId: logAnalytics.outputs.resourceId
    disableLocalAuth: true // ingestion only with Entra ID (APPLICATIONINSIGHTS_AUTHENTICATION_STRING)
  }
}

module keyVault 'app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: empty(keyVaultName) ? '${abbrs.keyVaultVaults}${resourceToken}' : keyVaultName
    location: location
    tags: tags
    proxyApiKeys: proxyApiKeys
    appPrincipalId: apiIdentity.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
  }
}

// The app's run events (Tunegrid.Run.<State> CloudEvents): identity-only topic; subscriptions are the user's (README).
module runEventsTopic 'app/run-events-topic.bicep' = {
  name: 'runEventsTopic'
  scope: rg
  params: {
    name: runEventsTopicName
    location: location
    tags: tags
  }
}

// Every setting the code reads (shared/settings.py SETTINGS) except the embedded backend's LOCAL_* ones,
// with the same defaults as local.settings.sample.json. The identity-based connections, AZURE_CLIENT_ID and
// the Application Insights settings are added by app/api.bicep. tests/test_infra.py checks both lists.
var appSettings = {
  FINETUNE_BACKEND: 'azureml'
  TUNEGRID_INSTANCE: tunegridInstance
  VALIDATION_MAX_LINE_BYTES: '1048576'
  VALIDATION_MAX_SEQ_LENGTH: '2048'
  VALIDATION_TOKENIZER: ''
  TEST_SPLIT_PERCENT: '5'
  BASE_MODEL_NAME: 'Phi-4'
  BASE_MODEL_LABEL: 'latest'
  BASE_MODEL_VERSION: ''
  AZURE_SUBSCRIPTION_ID: subscription().subscriptionId
  AZURE_RESOURCE_GROUP: mlWorkspaceResourceGroup
  AZUREML_WORKSPACE_NAME: mlWorkspaceName
  AZUREML_REGISTRY_NAME: mlRegistryName
  AZUREML_PIPELINE_COMPONENT: 'chat_completion_pipeline'
  AZUREML_PIPELINE_COMPONENT_LABEL: 'latest'
  AZUREML_PIPELINE_COMPONENT_VERSION: ''
  AZUREML_EXPERIMENT_NAME: 'chat_completion_{model}'
  AZUREML_COMPUTE: mlCompute
  AZUREML_INSTANCE_TYPE_MODEL_IMPORT: instanceTypeModelImport
  AZUREML_INSTANCE_TYPE_PREPROCESS: instanceTypePreprocess
  AZUREML_INSTANCE_TYPE_FINETUNE: instanceTypeFinetune
  AZUREML_INSTANCE_TYPE_MODEL_EVALUATION: instanceTypeModelEvaluation
  AZUREML_GPUS_PER_NODE: gpusPerNode
  AZUREML_NUM_NODES_FINETUNE: '1'
  AZUREML_DATASTORE: mlDatastore
  INFERENCE_INSTANCE_TYPE: inferenceInstanceType
  INFERENCE_INSTANCE_COUNT: '1'
  REQUEST_TIMEOUT_MS: '90000'
  LIVENESS_INITIAL_DELAY_S: '600'
  MAX_CONCURRENT_REQUESTS_PER_INSTANCE: '1'
  MIRROR_TRAFFIC_PERCENT: '0'
  SMOKE_ROWS: '3'
  SMOKE_TIMEOUT_S: '120'
  GATE_ROWS: '20'
  GATE_MAX_REGRESSION: '0.02'
  GATE_MAX_NEW_TOKENS: '128'
  MAX_RUN_COST_USD: ''
  ROLLOUT_SCHEDULE: '0 */1 * * * *'
  RUN_EVENTS_TOPIC_ENDPOINT: runEventsTopic.outputs.endpoint
  PROXY_API_KEYS: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.proxyKeysSecretUri})'
  PROXY_MAX_BODY_BYTES: '1048576'
  PROXY_MAX_TOKENS_CAP: '2048'
  PROXY_UPSTREAM_TIMEOUT_S: '200'
  PROXY_CREDENTIAL_TTL_S: '600'
  PROXY_QUEUE_TIMEOUT_S: '30'
  PROXY_QUEUE_MAX: '64'
  PROXY_DEFAULT_MAX_TOKENS: '256'
  // HTTP streams (azurefunctions-extensions-http-fastapi) need worker indexing at init (Functions host 4.34.1+).
  PYTHON_ENABLE_INIT_INDEXING: '1'
  JANITOR_SCHEDULE: '0 */15 * * * *'
  IDLE_MINUTES: '120'
  JANITOR_GRACE_MINUTES: '60'
  JANITOR_DRY_RUN: 'false'
}

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: appName
    location: location
    tags: tags
    applicationInsightsName: monitoring.outputs.name
    appServicePlanId: appServicePlan.outputs.resourceId
    runtimeName: 'python'
    runtimeVersion: '3.11'
    storageAccountName: storage.outputs.name
    deploymentStorageContainerName: deploymentStorageContainerName
    identityId: apiIdentity.outputs.resourceId
    identityClientId: apiIdentity.outputs.clientId
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    appSettings: appSettings
  }
}

// BlobCreated events of the data account; the subscription to the ingest function is added after deploy.
module storageTopic 'app/system-topic.bicep' = {
  name: 'storageSystemTopic'
  scope: rg
  params: {
    name: storageSystemTopicName
    location: location
    tags: tags
    sourceResourceId: storage.outputs.resourceId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

// Roles on the workspace and its job-events system topic, in the workspace's resource group.
module ml 'app/ml-workspace.bicep' = {
  name: 'mlWorkspaceAccess-${resourceToken}'
  scope: resourceGroup(mlWorkspaceResourceGroup)
  params: {
    workspaceName: mlWorkspaceName
    systemTopicName: mlTopicName
    tags: tags
    appPrincipalId: apiIdentity.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
  }
}

module registryAccess 'app/registry-access.bicep' = if (assignRegistryRole) {
  name: 'mlRegistryAccess-${resourceToken}'
  scope: resourceGroup(empty(mlRegistryResourceGroup) ? mlWorkspaceResourceGroup : mlRegistryResourceGroup)
  params: {
    registryName: mlRegistryName
    principalId: apiIdentity.outputs.principalId
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbacAssignments'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    appInsightsName: monitoring.outputs.name
    deadLetterContainerName: deadLetterContainerName
    runEventsTopicName: runEventsTopic.outputs.name
    managedIdentityPrincipalId: apiIdentity.outputs.principalId
    userIdentityPrincipalId: principalId
    userPrincipalType: principalType
    eventGridPrincipalIds: [
      storageTopic.outputs.principalId
      ml.outputs.systemTopicPrincipalId
      runEventsTopic.outputs.principalId
    ]
  }
}

// ---------------------------------------------------------------- outputs (azd env values; read by scripts/post-deploy.*)

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = api.outputs.SERVICE_API_NAME
output SERVICE_API_NAME string = api.outputs.SERVICE_API_NAME
output SERVICE_API_URI string = api.outputs.SERVICE_API_URI
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output PROXY_API_KEYS_SECRET_NAME string = keyVault.outputs.proxyKeysSecretName
output STORAGE_SYSTEM_TOPIC_NAME string = storageTopic.outputs.name
output TRAINING_CONTAINER_NAME string = trainingContainerName
output DEAD_LETTER_CONTAINER_NAME string = deadLetterContainerName
output AZUREML_WORKSPACE_NAME string = mlWorkspaceName
output AZUREML_RESOURCE_GROUP string = mlWorkspaceResourceGroup
output AZUREML_SYSTEM_TOPIC_NAME string = ml.outputs.systemTopicName
output RUN_EVENTS_TOPIC_NAME string = runEventsTopic.outputs.name
