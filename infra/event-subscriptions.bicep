// The two Event Grid subscriptions, deployed by scripts/post-deploy.{sh,ps1} into the app's resource group once
// the code is deployed: they point at the host's extension webhooks, whose system keys (blobs_extension,
// eventgrid_extension) exist only after the host has indexed the functions. Re-deploying is idempotent.
targetScope = 'resourceGroup'

@description('Name of the Function App (azd output AZURE_FUNCTION_NAME).')
param functionAppName string

@description('Data storage account: source of BlobCreated and home of the dead-letter container.')
param storageAccountName string

@description('System topic on the storage account (azd output STORAGE_SYSTEM_TOPIC_NAME).')
param storageSystemTopicName string

@description('Container watched by the ingest blob trigger (shared.settings.TRAINING_CONTAINER).')
param trainingContainerName string = 'training-data'

@description('Container Event Grid dead-letters into (azd output DEAD_LETTER_CONTAINER_NAME).')
param deadLetterContainerName string = 'eventgrid-deadletter'

@description('Resource group of the Azure ML workspace (azd output AZUREML_RESOURCE_GROUP).')
param mlWorkspaceResourceGroup string

@description('System topic on the workspace (azd output AZUREML_SYSTEM_TOPIC_NAME).')
param mlSystemTopicName string

@description('Name of the Event Grid based blob trigger function (webhook functionName=Host.Functions.<name>).')
param ingestFunctionName string = 'ingest_dataset'

@description('Name of the Event Grid trigger function that receives Azure ML job events.')
param jobEventsFunctionName string = 'job_events'

@secure()
@description('The host\'s blobs_extension system key.')
param blobsExtensionKey string

@secure()
@description('The host\'s eventgrid_extension system key.')
param eventGridExtensionKey string

@minValue(1)
@maxValue(30)
@description('Delivery attempts before an event is dead-lettered.')
param maxDeliveryAttempts int = 30

@minValue(1)
@maxValue(1440)
@description('Minutes Event Grid keeps retrying one event.')
param eventTimeToLiveInMinutes int = 1440

resource site 'Microsoft.Web/sites@2023-12-01' existing = {
  name: functionAppName
}

resource storageAccount 'Microsoft.Storage/storageAccounts@2022-09-01' existing = {
  name: storageAccountName
}

resource storageTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' existing = {
  name: storageSystemTopicName
}

var deadLetter = {
  identity: {
    type: 'SystemAssigned'
  }
  deadLetterDestination: {
    endpointType: 'StorageBlob'
    properties: {
      resourceId: storageAccount.id
      blobContainerName: deadLetterContainerName
    }
  }
}

// BlobCreated of a complete upload (not every block of a multi-request one) of a .jsonl under training-data/.
resource ingestSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: storageTopic
  name: 'tunegrid-ingest'
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${site.properties.defaultHostName}/runtime/webhooks/blobs?functionName=Host.Functions.${ingestFunctionName}&code=${blobsExtensionKey}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/${trainingContainerName}/'
      subjectEndsWith: '.jsonl'
      isSubjectCaseSensitive: false
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.api'
          values: [
            'CopyBlob'
            'PutBlob'
            'PutBlockList'
            'FlushWithClose'
          ]
        }
      ]
    }
    retryPolicy: {
      maxDeliveryAttempts: maxDeliveryAttempts
      eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
    }
    deadLetterWithResourceIdentity: deadLetter
  }
}

module jobEvents 'app/job-events-subscription.bicep' = {
  name: 'tunegrid-jobs-${uniqueString(functionAppName)}'
  scope: resourceGroup(mlWorkspaceResourceGroup)
  params: {
    systemTopicName: mlSystemTopicName
    subscriptionName: 'tunegrid-jobs-${take(functionAppName, 40)}'
    endpointUrl: 'https://${site.properties.defaultHostName}/runtime/webhooks/eventgrid?functionName=${jobEventsFunctionName}&code=${eventGridExtensionKey}'
    deadLetterStorageAccountId: storageAccount.id
    deadLetterContainerName: deadLetterContainerName
    maxDeliveryAttempts: maxDeliveryAttempts
    eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
  }
}

output INGEST_SUBSCRIPTION_NAME string = ingestSubscription.name
output JOB_EVENTS_SUBSCRIPTION_NAME string = jobEvents.outputs.name
