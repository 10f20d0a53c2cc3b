// Deployed into the Azure ML workspace's resource group by infra/event-subscriptions.bicep: the workspace's
// job events, narrowed to the pipeline runs this app submitted, delivered to the job_events function.
@description('Name of the workspace\'s Event Grid system topic.')
param systemTopicName string

@maxLength(64)
@description('Name of the event subscription (one per Function App).')
param subscriptionName string

@secure()
@description('Webhook of the Event Grid trigger: /runtime/webhooks/eventgrid?functionName=<fn>&code=<eventgrid_extension key>.')
param endpointUrl string

@description('Resource id of the storage account holding the dead-letter container.')
param deadLetterStorageAccountId string

@description('Container Event Grid dead-letters into.')
param deadLetterContainerName string

@minValue(1)
@maxValue(30)
@description('Delivery attempts before an event is dead-lettered.')
param maxDeliveryAttempts int = 30

@minValue(1)
@maxValue(1440)
@description('Minutes Event Grid keeps retrying one event.')
param eventTimeToLiveInMinutes int = 1440

resource topic 'Microsoft.EventGrid/systemTopics@2025-02-15' existing = {
  name: systemTopicName
}

// Advanced filter keys use dots as path separators and cannot escape a dot inside a key: hence the dot-free
// run tag tunegridrunid (shared.backends.base.RUN_TAG), set on the parent pipeline job at submission.
// Steps of the pipeline (azureml.StepRun) carry their own events and are filtered out by runType.
resource jobEvents 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: topic
  name: subscriptionName
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: endpointUrl
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.MachineLearningServices.RunCompleted'
        'Microsoft.MachineLearningServices.RunStatusChanged'
      ]
      advancedFilters: [
        {
          operatorType: 'IsNotNull'
          key: 'data.runTags.tunegridrunid'
        }
        {
          operatorType: 'StringIn'
          key: 'data.runType'
          values: [
            'azureml.PipelineRun'
          ]
        }
      ]
    }
    retryPolicy: {
      maxDeliveryAttempts: maxDeliveryAttempts
      eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: deadLetterStorageAccountId
          blobContainerName: deadLetterContainerName
        }
      }
    }
  }
}

output name string = jobEvents.name
