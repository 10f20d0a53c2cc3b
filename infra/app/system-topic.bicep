// An Event Grid system topic with a system-assigned identity. The identity is what dead-letters undeliverable
// events into the data account (deadLetterWithResourceIdentity), so no storage key is ever handed to Event Grid.
// Plain resource rather than AVM event-grid/system-topic 0.6.1 (the sample's), for the identity and its
// principal id output; API version as in the AVM module's source.
@description('Name of the system topic.')
param name string

@description('Region: the source resource\'s region.')
param location string

@description('Tags of the topic.')
param tags object = {}

@description('Resource id of the resource whose events the topic carries.')
param sourceResourceId string

@allowed([
  'Microsoft.Storage.StorageAccounts'
  'Microsoft.MachineLearningServices.Workspaces'
])
@description('Event Grid topic type of the source.')
param topicType string

resource topic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: sourceResourceId
    topicType: topicType
  }
}

output name string = topic.name
output principalId string = topic.identity.principalId
